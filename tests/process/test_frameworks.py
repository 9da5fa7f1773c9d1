"""Flask and Django under Baton, end to end: a real Flask app (tests/apps/flaskdemo.py)
and a real Django project (tests/apps/djangodemo/), started as a gunicorn user types it
(`baton serve djangodemo.wsgi`) and from a TOML config, each sent a 5 MB multipart
upload, a streamed response of 1,000 chunks and a 20 MB file (whole and one Range),
every body checked byte for byte; and SIGHUPs under the Django app lose no request."""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import threading
import uuid

import pytest
from conftest import REPO, free_port, wait_for
from test_cli import Serve

APPS = REPO / "tests" / "apps"
UPLOAD_SIZE = 5 << 20
FILE_SIZE = 20 << 20
STREAM_CHUNKS = 1000
# What a gunicorn user types for each: Flask's `module:app`, Django's `project.wsgi`.
MODULES = {"flask": "flaskdemo:app", "django": "djangodemo.wsgi"}
# A config file's `module` names the callable.
CONFIG_MODULES = {"flask": "flaskdemo:app", "django": "djangodemo.wsgi:application"}

def stream_body() -> bytes:
    """What /stream must send, computed here, not by the app: chunk i is sha256(i) repeated
    1 + i % 64 times."""
    return b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() * (1 + i % 64)
                    for i in range(STREAM_CHUNKS))


def multipart(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with one file, and its Content-Type."""
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture
def demo_file(scratch):
    """A 20 MB file of random bytes the app's user (nobody, as root) can read."""
    path = scratch / "demo.bin"
    path.write_bytes(os.urandom(FILE_SIZE))
    path.chmod(0o644)
    return path


class Client:
    """One keep-alive connection; each request must leave it open."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        self.conn.request(method, path, body=body, headers=headers or {})
        response = self.conn.getresponse()
        data = response.read()
        assert not response.will_close, (method, path, response.status, response.getheaders())
        return response, data

    def close(self) -> None:
        self.conn.close()


def check_everything(port: int, demo_file) -> None:
    """The upload, the stream, the file and a Range of it, byte for byte, on one connection."""
    client = Client(port)
    try:
        upload = os.urandom(UPLOAD_SIZE)
        body, content_type = multipart("file", "upload.bin", upload)
        response, data = client.request("POST", "/upload", body, {"Content-Type": content_type})
        assert response.status == 200, data[:500]
        assert json.loads(data) == {"sha256": hashlib.sha256(upload).hexdigest(), "size": UPLOAD_SIZE,
                                    "filename": "upload.bin"}

        response, data = client.request("GET", "/stream")
        assert response.status == 200, data[:500]
        assert response.getheader("Transfer-Encoding") == "chunked"
        assert hashlib.sha256(data).hexdigest() == hashlib.sha256(stream_body()).hexdigest()

        expected = demo_file.read_bytes()
        response, data = client.request("GET", "/file")
        assert response.status == 200, data[:500]
        assert response.getheader("Content-Length") == str(FILE_SIZE)
        assert len(data) == FILE_SIZE
        assert hashlib.sha256(data).hexdigest() == hashlib.sha256(expected).hexdigest()

        start, end = 1_000_003, 3_000_000
        response, data = client.request("GET", "/file", headers={"Range": f"bytes={start}-{end}"})
        assert response.status == 206, data[:500]
        assert response.getheader("Content-Range") == f"bytes {start}-{end}/{FILE_SIZE}"
        assert response.getheader("Content-Length") == str(end - start + 1)
        assert data == expected[start:end + 1]
    finally:
        client.close()


def ready(port: int) -> bool:
    try:
        client = Client(port)
        try:
            return client.request("GET", "/client")[0].status == 200
        finally:
            client.close()
    except (OSError, http.client.HTTPException):
        return False


@pytest.fixture
def serve(tmp_path):
    started: list[Serve] = []

    def start(*args: str) -> Serve:
        started.append(Serve(tmp_path, *args))
        return started[-1]
    yield start
    for instance in started:
        instance.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("framework", ["flask", "django"])
def test_served_as_a_gunicorn_user_types_it(serve, port, demo_file, framework):
    master = serve(MODULES[framework], "--bind", f"127.0.0.1:{port}", "--workers", "2", "--threads", "2",
                   "--chdir", str(APPS), "-e", f"DEMO_FILE={demo_file}")
    master.wait_ready(port, 2, answer=ready)
    check_everything(port, demo_file)
    assert master.stop() == 0


def config(port: int, framework: str, demo_file, workers: int = 2) -> str:
    return f"""
        [master]
        graceful_timeout = 10
        boot_timeout = 30

        [listeners.web]
        bind = "127.0.0.1:{port}"
        mode = "balance"

        [apps.{framework}]
        module = "{CONFIG_MODULES[framework]}"
        listeners = ["web"]
        workers = {workers}
        threads = 2
        keepalive = 60
        chdir = "{APPS}"
        env = {{ DEMO_FILE = "{demo_file}" }}
    """


@pytest.mark.timeout(120)
@pytest.mark.parametrize("framework", ["flask", "django"])
def test_served_from_a_config_file_in_balance_mode(baton, port, demo_file, framework):
    master = baton(config(port, framework, demo_file))
    master.wait_workers(2, timeout=30)
    wait_for(lambda: ready(port), timeout=30, message=lambda: f"the app to answer; log:\n{master.log()}")
    # Two clients at once, so both workers (and both threads of each) serve.
    errors: list[BaseException] = []

    def run():
        try:
            check_everything(port, demo_file)
        except BaseException as exc:  # reported by the test thread below
            errors.append(exc)
    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert not errors, errors
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0


class Traffic(threading.Thread):
    """Requests back to back on one keep-alive connection, each checked byte for byte,
    until told to stop: an upload, the stream and a Range of the file in turn. Every
    error, wrong body or closed connection is a failure."""

    def __init__(self, port: int, expected_file: bytes):
        super().__init__(daemon=True)
        self.port = port
        self.expected_file = expected_file
        self.stream = hashlib.sha256(stream_body()).hexdigest()
        self.stop = threading.Event()
        self.requests = 0
        self.failures: list[str] = []
        self.pids: set[int] = set()

    def run(self) -> None:
        client = Client(self.port)
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                self.one(client, n)
            except (AssertionError, OSError, http.client.HTTPException) as exc:
                self.failures.append(repr(exc))
                client.close()
                client = Client(self.port)
                continue
            self.requests += 1
        client.close()

    def one(self, client: Client, n: int) -> None:
        kind = n % 4
        if kind == 0:
            upload = os.urandom(64 << 10)
            body, content_type = multipart("file", "small.bin", upload)
            response, data = client.request("POST", "/upload", body, {"Content-Type": content_type})
            assert response.status == 200 and json.loads(data)["sha256"] == hashlib.sha256(upload).hexdigest()
        elif kind == 1:
            response, data = client.request("GET", "/stream")
            assert response.status == 200 and hashlib.sha256(data).hexdigest() == self.stream
        elif kind == 2:
            start = (n * 7919) % (FILE_SIZE - 65536)
            response, data = client.request("GET", "/file", headers={"Range": f"bytes={start}-{start + 65535}"})
            assert response.status == 206 and data == self.expected_file[start:start + 65536]
        else:
            response, data = client.request("GET", "/client")
            assert response.status == 200
            self.pids.add(json.loads(data)["pid"])


@pytest.mark.timeout(180)
def test_sighups_under_the_django_app_lose_no_request(baton, port, demo_file):
    master = baton(config(port, "django", demo_file))
    master.wait_workers(2, timeout=30)
    wait_for(lambda: ready(port), timeout=30, message=lambda: f"the app to answer; log:\n{master.log()}")
    expected_file = demo_file.read_bytes()
    traffic = [Traffic(port, expected_file) for _ in range(4)]
    for thread in traffic:
        thread.start()
    try:
        wait_for(lambda: all(t.requests for t in traffic), timeout=30, message="every client to get answers")
        for generation in range(2, 5):
            old = set(master.workers())
            master.signal(signal.SIGHUP)
            master.wait_log(f"generation {generation} serving", timeout=60)
            new = set(master.wait_workers(2, timeout=30, exclude=old))
            wait_for(lambda: any(t.pids & new for t in traffic), timeout=30,
                     message=f"generation {generation} to answer")
    finally:
        for thread in traffic:
            thread.stop.set()
        for thread in traffic:
            thread.join(60)
    assert [f for t in traffic for f in t.failures] == []
    assert all(t.requests > 0 for t in traffic)


# -- behind a real nginx, over a UNIX socket, as the README sets it up ---------------------

NGINX = shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")

NGINX_CONF = """
worker_processes 1;
user www-data;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    upstream baton {{
        server unix:{socket};
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 50m;
        location / {{
            proxy_pass http://baton;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"""


@pytest.fixture
def nginx(scratch):
    """Factory: nginx(port, socket) -> a real nginx (workers as www-data) on 127.0.0.1:port
    in front of the UNIX socket; stopped by pid at teardown."""
    if NGINX is None or os.geteuid() != 0:
        pytest.skip("needs nginx and root (its workers run as www-data)")
    procs: list[subprocess.Popen] = []

    def start(port: int, socket_path) -> subprocess.Popen:
        prefix = scratch / "nginx"
        prefix.mkdir()
        conf = prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(prefix=prefix, socket=socket_path, port=port))
        # -e: the error log before the config is read (the default path may not exist).
        procs.append(subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"),
                                       "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        return procs[-1]
    yield start
    for proc in procs:
        proc.terminate()   # nginx's fast shutdown; its workers go with it
        proc.wait(15)


@pytest.mark.timeout(120)
def test_behind_nginx_over_a_unix_socket(baton, nginx, scratch, demo_file):
    socket_path = scratch / "run" / "app.sock"
    port, nginx_port = free_port(), free_port()
    master = baton(f"""
        [master]
        graceful_timeout = 10

        [listeners.web]
        bind = "127.0.0.1:{port}"

        [listeners.nginx]
        bind = "unix:{socket_path}"
        socket_group = "www-data"
        socket_mode = "0660"
        socket_dir_mode = "0750"

        [apps.django]
        module = "djangodemo.wsgi:application"
        listeners = ["nginx", "web"]
        chdir = "{APPS}"
        workers = 2
        env = {{ DEMO_FILE = "{demo_file}" }}
        forwarded_allow_ips = ["127.0.0.1", "::1"]
        secure_scheme_headers = {{ X-Forwarded-Proto = "https" }}
    """)
    master.wait_workers(2, timeout=30)
    wait_for(lambda: ready(port), timeout=30, message=lambda: f"the app to answer; log:\n{master.log()}")
    proc = nginx(nginx_port, socket_path)
    wait_for(lambda: proc.poll() is not None or ready(nginx_port), timeout=30, message="nginx to answer")
    assert proc.poll() is None, (scratch / "nginx" / "error.log").read_text()

    check_everything(nginx_port, demo_file)
    client = Client(nginx_port)
    try:
        # nginx appends its peer (the client, 127.0.0.1, trusted): the walk takes the
        # entry it vouches for and stops there; the leftmost one is the client's to forge.
        _, data = client.request("GET", "/client", headers={"X-Forwarded-For": "6.6.6.6, 203.0.113.7",
                                                            "X-Forwarded-Proto": "https"})
        assert json.loads(data)["remote_addr"] == "203.0.113.7"
        assert json.loads(data)["scheme"] == "http"   # nginx overwrote the client's https
        _, data = client.request("GET", "/client")
        assert json.loads(data)["remote_addr"] == "127.0.0.1"
    finally:
        client.close()
