"""HTTPS: each app's own workers terminate TLS with its own key, routed by SNI.

Real certificates (tests/tlscerts.py, the openssl command), a real master, real clients
(the ssl module, and curl when it is installed)."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import REPO, children_of, free_port, http_request, wait_for
from tlscerts import Authority, key_marker

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")


class SNIConnection(http.client.HTTPSConnection):
    """An HTTPS connection to 127.0.0.1:`port` saying `sni` (None: no SNI at all)."""

    def __init__(self, port: int, sni: str | None, context: ssl.SSLContext, session=None, timeout=10.0):
        super().__init__(sni or "127.0.0.1", port, context=context, timeout=timeout)
        self.sni = sni
        self.session = session

    def connect(self) -> None:
        raw = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.sni, session=self.session)


def client_context(ca: Authority, cert=None, max_version=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.cert))
    if cert is not None:
        context.load_cert_chain(*map(str, cert))
    if max_version is not None:
        context.maximum_version = max_version
    return context


def get(port, sni, context, path="/", conn=None):
    """(status, headers, decoded JSON or bytes, the connection's peer certificate)."""
    own = conn is None
    conn = conn or SNIConnection(port, sni, context)
    try:
        conn.request("GET", path, headers={"Host": sni or "127.0.0.1"})
        cert = conn.sock.getpeercert()   # (a response that closes takes the socket away)
        response = conn.getresponse()
        body = response.read()
        try:
            body = json.loads(body)
        except ValueError:
            pass
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body, cert
    finally:
        if own:
            conn.close()


def common_name(cert) -> str:
    return dict(item[0] for item in cert["subject"])["commonName"]


@pytest.fixture
def pki(tmp_path):
    ca = Authority(tmp_path)
    return ca


def one_app_config(port, cert, key, app="", master="", listener="") -> str:
    """App a alone behind a `tls = true` listener on `port`, with its certificate and
    key; `app`, `master` and `listener` add lines to those tables."""
    return f"""
        [master]
        {master}

        [listeners.web]
        bind = "127.0.0.1:{port}"
        tls = true
        {listener}

        [apps.a]
        module = "tests.apps.tlsprobe:app"
        listeners = ["web"]
        chdir = "{REPO}"
        certificate = "{cert}"
        private_key = "{key}"
        {app}
    """


def two_app_config(port, certs, extra_a="", extra_b="", listener_extra="", master_extra=""):
    (cert_a, key_a), (cert_b, key_b) = certs
    return f"""
        [master]
        graceful_timeout = 5
        {master_extra}

        [listeners.web]
        bind = "127.0.0.1:{port}"
        tls = true
        {listener_extra}

        [apps.a]
        module = "tests.apps.tlsprobe:app"
        listeners = ["web"]
        chdir = "{REPO}"
        hosts = ["a.test"]
        default = true
        certificate = "{cert_a}"
        private_key = "{key_a}"
        env = {{ APP_NAME = "a" }}
        {extra_a}

        [apps.b]
        module = "tests.apps.tlsprobe:app"
        listeners = ["web"]
        chdir = "{REPO}"
        hosts = ["b.test", "*.b.test"]
        user = "www-data"
        certificate = "{cert_b}"
        private_key = "{key_b}"
        env = {{ APP_NAME = "b" }}
        {extra_b}
    """


@pytest.fixture
def two_apps(baton, port, pki):
    certs = (pki.issue("a.test", ["a.test"]), pki.issue("b.test", ["b.test", "*.b.test"]))
    master = baton(two_app_config(port, certs))
    master.wait_workers(2)
    return master, certs


def test_two_apps_on_one_port_each_with_its_own_certificate_routed_by_sni(two_apps, port, pki):
    master, certs = two_apps
    context = client_context(pki)
    status, _, body, cert = get(port, "a.test", context)
    assert status == 200 and body["app"] == "a" and common_name(cert) == "a.test"
    assert body["tls"]["HTTPS"] == "on" and body["tls"]["wsgi.url_scheme"] == "https"
    assert body["tls"]["SSL_CLIENT_VERIFY"] == "NONE"
    for sni in ("b.test", "x.b.test"):   # exact, and wildcard
        status, _, body, cert = get(port, sni, context)
        assert status == 200 and body["app"] == "b" and common_name(cert) == "b.test"
        assert body["tls"]["SSL_TLS_SNI"] == sni
    # No SNI at all: the listener's default app.
    bare = ssl.create_default_context(cafile=str(pki.cert))
    bare.check_hostname = False
    status, _, body, cert = get(port, None, bare)
    assert body["app"] == "a" and common_name(cert) == "a.test" and "SSL_TLS_SNI" not in body["tls"]
    # ALPN offers http/1.1 (and takes nothing else).
    offered = client_context(pki)
    offered.set_alpn_protocols(["h2", "http/1.1"])
    with offered.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="a.test") as sock:
        assert sock.selected_alpn_protocol() == "http/1.1"
    # An SNI no app serves (and no default for it... a has default = true): a's certificate.
    if shutil.which("curl") is None:
        return
    for host, app in (("a.test", "a"), ("b.test", "b")):
        out = subprocess.run(["curl", "-sS", "--cacert", str(pki.cert), "--resolve", f"{host}:{port}:127.0.0.1",
                              f"https://{host}:{port}/"], capture_output=True, text=True, timeout=20)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["app"] == app


def test_a_keep_alive_connection_serves_many_requests_and_big_responses(two_apps, port, pki):
    context = client_context(pki)
    conn = SNIConnection(port, "b.test", context)
    try:
        pids = {get(port, "b.test", context, conn=conn)[2]["pid"] for _ in range(20)}
        assert len(pids) == 1
        size = 5 << 20   # far past a socket buffer: the loop waits for the client between records
        status, _, body, _ = get(port, "b.test", context, f"/big?size={size}", conn=conn)
        assert status == 200 and body == b"x" * size
        assert get(port, "b.test", context, conn=conn)[0] == 200   # and the connection goes on
    finally:
        conn.close()


def test_mutual_tls_accepts_a_good_client_certificate_and_refuses_none(baton, port, pki, tmp_path):
    clients = Authority(tmp_path, "Client CA")
    client = clients.issue("client-1", client=True, serial=0xBA7)
    cert, key = pki.issue("a.test", ["a.test"])
    master = baton(f"""
        [listeners.web]
        bind = "127.0.0.1:{port}"
        tls = true

        [apps.a]
        module = "tests.apps.tlsprobe:app"
        listeners = ["web"]
        chdir = "{REPO}"
        certificate = "{cert}"
        private_key = "{key}"
        client_ca = "{clients.cert}"
    """)
    master.wait_workers(1)
    status, _, body, _ = get(port, "a.test", client_context(pki, client))
    assert status == 200
    tls = body["tls"]
    assert tls["SSL_CLIENT_VERIFY"] == "SUCCESS"
    assert tls["SSL_CLIENT_S_DN"] == "CN=client-1,O=Baton Tests"
    assert tls["SSL_CLIENT_I_DN"] == "CN=Client CA,O=Baton Tests"
    assert tls["SSL_CLIENT_SERIAL"] == "0BA7"
    assert tls["SSL_CLIENT_CERT"].startswith("-----BEGIN CERTIFICATE-----")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        get(port, "a.test", client_context(pki))
    # One signed by another CA is refused too.
    stranger = pki.issue("stranger", client=True)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        get(port, "a.test", client_context(pki, stranger))


def test_root_only_keys_work_and_no_other_process_can_reach_them(two_apps, port, pki):
    """Keys 0600 root: each app's workers (nobody, www-data) serve with their own key,
    cannot open the other's, and hold no byte of either key's PEM in Python memory;
    no fd of a worker or the balancer points at a key file or its memfd."""
    if os.geteuid() != 0:
        pytest.skip("needs root: workers run as other users")
    master, ((cert_a, key_a), (cert_b, key_b)) = two_apps
    assert key_a.stat().st_uid == 0 and key_a.stat().st_mode & 0o777 == 0o600
    context = client_context(pki)
    from urllib.parse import quote
    for sni, own, other in (("b.test", key_b, key_a), ("a.test", key_a, key_b)):
        for path, marker in ((other, key_marker(other)), (own, key_marker(own))):
            status, _, found, _ = get(port, sni, context, f"/reach?path={quote(str(path))}&rmarker={quote(marker[::-1])}")
            assert status == 200
            assert found["opened"] == "Permission denied", (sni, path)
            assert found["holds"] is False, (sni, path)
            links = found["fds"].values()
            assert not any("baton-tls" in link or link.endswith(".key") for link in links), links
    balancer = master.balancer()
    for pid in (balancer, *master.workers()):
        links = fd_links(pid)
        assert not any("baton-tls" in link or link.endswith(".key") for link in links), (pid, links)


def fd_links(pid: int) -> list[str]:
    links = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except FileNotFoundError:   # closed meanwhile (a connection ending)
            pass
    return links


def test_a_bad_certificate_or_key_is_named_by_baton_check(tmp_path, pki, port):
    cert_a, key_a = pki.issue("a.test", ["a.test"])
    cert_b, key_b = pki.issue("b.test", ["b.test"])
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key\n")
    config = tmp_path / "check.toml"

    def check(cert, key) -> str:
        config.write_text(f"""
[listeners.web]
bind = "127.0.0.1:{port}"
tls = true

[apps.a]
module = "tests.apps.tlsprobe:app"
listeners = ["web"]
chdir = "{REPO}"
certificate = "{cert}"
private_key = "{key}"
""")
        out = subprocess.run([str(REPO / ".venv/bin/baton"), "check", "-c", str(config)], capture_output=True,
                             text=True, cwd=REPO, timeout=60)
        return out.stdout + out.stderr
    assert "ok (1 app" in check(cert_a, key_a)
    assert f"apps.a.private_key: the private key in {key_b} does not match the certificate in {cert_a}" \
        in check(cert_a, key_b)
    assert f"apps.a.private_key: expected a PEM private key in {garbage}" in check(cert_a, garbage)
    assert f"apps.a.certificate: cannot read {tmp_path / 'none.crt'}: No such file or directory" \
        in check(tmp_path / "none.crt", key_a)
    assert f"apps.a.certificate: expected PEM certificates in {garbage}" in check(garbage, key_a)


# -- reloads, rotation ------------------------------------------------------------------------


class Clients:
    """`count` threads, each looping keep-alive HTTPS requests (a new connection when the
    server closes one) until `stop()`; every failure is kept."""

    def __init__(self, port: int, sni: str, context: ssl.SSLContext, count: int):
        self.port, self.sni, self.context = port, sni, context
        self.done = threading.Event()
        self.failures: list[str] = []
        self.served = 0
        self.serials: set[str] = set()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def _loop(self) -> None:
        conn = None
        while not self.done.is_set():
            try:
                if conn is None:
                    conn = SNIConnection(self.port, self.sni, self.context)
                conn.request("GET", "/", headers={"Host": self.sni})
                serial = conn.sock.getpeercert()["serialNumber"]
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    raise AssertionError(f"status {response.status}: {body!r}")
                with self.lock:
                    self.served += 1
                    self.serials.add(serial)
                if response.will_close:
                    conn.close()
                    conn = None
            except Exception as exc:  # noqa: BLE001 - every failure is the test's finding
                with self.lock:
                    self.failures.append(repr(exc))
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def wait_served(self, more: int) -> None:
        target = self.served + more
        wait_for(lambda: self.served >= target or self.failures, 30, message="requests served")

    def stop(self) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(30)


def test_ten_reloads_under_sixteen_tls_keep_alive_clients_fail_no_request(baton, port, pki):
    cert, key = pki.issue("a.test", ["a.test"])
    master = baton(one_app_config(port, cert, key, master="graceful_timeout = 10", app="workers = 2"))
    master.wait_workers(2)
    clients = Clients(port, "a.test", client_context(pki), 16)
    try:
        for reload in range(10):
            clients.wait_served(50)
            master.signal(signal.SIGHUP)
            master.wait_log("ready", count=2 * (reload + 2), timeout=30)
        clients.wait_served(50)
    finally:
        clients.stop()
    assert clients.failures == []
    assert clients.served > 500


def test_a_retiring_worker_closes_an_idle_tls_connection_after_its_next_request(baton, port, pki):
    cert, key = pki.issue("a.test", ["a.test"])
    master = baton(one_app_config(port, cert, key, master="graceful_timeout = 10", app="keepalive = 30"))
    old = master.wait_workers(1)
    context = client_context(pki)
    conn = SNIConnection(port, "a.test", context)
    try:
        status, headers, body, _ = get(port, "a.test", context, conn=conn)
        assert status == 200 and headers.get("connection") != "close"
        master.signal(signal.SIGHUP)
        master.wait_workers(1, exclude=old, timeout=20)
        master.wait_log("generation 1 draining")
        # The connection stays at the retiring worker, which keeps it (its TLS state
        # cannot move) and answers its next request with Connection: close (once its
        # STOP, sent with that log line, is read: until then it is still serving).
        answers = []

        def closing():
            status, headers, body, _ = get(port, "a.test", context, conn=conn)
            answers.append((status, body["pid"]))
            return headers.get("connection") == "close"
        wait_for(closing, 10, message="an answer with Connection: close")
        assert set(answers) == {(200, old[0])}
    finally:
        conn.close()
    wait_for(lambda: old[0] not in children_of(master.pid), 15, message="the old worker's exit")
    assert get(port, "a.test", context)[2]["pid"] != old[0]


def _replace(path: Path, source: Path) -> None:
    """Put `source`'s bytes at `path` by rename, as certbot and friends do."""
    tmp = path.with_name(path.name + ".new")
    shutil.copyfile(source, tmp)
    os.chmod(tmp, path.stat().st_mode & 0o777)
    os.replace(tmp, path)


def test_certificate_rotation_under_load_drops_nothing(baton, port, pki, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    first = pki.issue("a.test", ["a.test"], stem="first", serial=0x111)
    second = pki.issue("a.test", ["a.test"], stem="second", serial=0x222)
    cert, key = live / "a.crt", live / "a.key"
    shutil.copyfile(first[0], cert)
    shutil.copyfile(first[1], key)
    key.chmod(0o600)
    master = baton(one_app_config(port, cert, key, app="workers = 2"))
    master.wait_workers(2)
    master.wait_log("is watching")
    clients = Clients(port, "a.test", client_context(pki), 8)
    try:
        clients.wait_served(50)
        assert clients.serials == {"0111"}
        _replace(key, second[1])
        _replace(cert, second[0])
        wait_for(lambda: "0222" in clients.serials or clients.failures, 30,
                 message=lambda: f"the new certificate; log:\n{master.log()}")
        clients.wait_served(50)
    finally:
        clients.stop()
    assert clients.failures == []
    assert get(port, "a.test", client_context(pki))[3]["serialNumber"] == "0222"


def test_a_broken_or_mismatched_key_is_refused_and_the_old_generation_serves(baton, port, pki, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    first = pki.issue("a.test", ["a.test"], stem="first")
    other = pki.issue("a.test", ["a.test"], stem="other")
    cert, key = live / "a.crt", live / "a.key"
    shutil.copyfile(first[0], cert)
    shutil.copyfile(first[1], key)
    master = baton(one_app_config(port, cert, key))
    workers = master.wait_workers(1)
    master.wait_log("is watching")
    context = client_context(pki)
    _replace(key, other[1])   # a key of another certificate
    master.wait_log(f"apps.a.private_key: the private key in {key} does not match the certificate in {cert}")
    garbage = tmp_path / "garbage"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    _replace(key, garbage)
    master.wait_log(f"apps.a.private_key: expected a PEM private key in {key}")
    status, _, body, _ = get(port, "a.test", context)
    assert status == 200 and body["pid"] == workers[0]
    # A SIGHUP re-reads the config, whose key does not load: refused, still serving.
    master.signal(signal.SIGHUP)
    master.wait_log("does not match", count=1)
    wait_for(lambda: "expected a PEM private key" in master.log().split("SIGHUP", 1)[-1], 15,
             message=lambda: master.log())
    assert get(port, "a.test", context)[2]["pid"] == workers[0]
    _replace(key, first[1])   # put right: the next generation takes it
    master.wait_workers(1, exclude=workers, timeout=20)


def test_sessions_resume_at_another_worker_and_across_generations(baton, port, pki):
    cert, key = pki.issue("a.test", ["a.test"])
    master = baton(one_app_config(port, cert, key, master="graceful_timeout = 5", app='workers = 2\nbalance = "round-robin"'))
    master.wait_workers(2)

    def first_session(context):
        conn = SNIConnection(port, "a.test", context)
        try:
            pid = get(port, "a.test", context, conn=conn)[2]["pid"]
            return pid, conn.sock.session
        finally:
            conn.close()

    def resumed_at(context, session, other_than) -> int:
        """Connect with `session` until a worker other than `other_than` answers; every
        connection must have resumed."""
        for _ in range(20):
            conn = SNIConnection(port, "a.test", context, session=session)
            try:
                pid = get(port, "a.test", context, conn=conn)[2]["pid"]
                assert conn.sock.session_reused, "a full handshake: the session was not resumed"
            finally:
                conn.close()
            if pid not in other_than:
                return pid
        raise AssertionError("never reached another worker")

    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        context = client_context(pki, max_version=version)
        pid, session = first_session(context)
        assert session is not None
        resumed_at(context, session, {pid})
    context = client_context(pki)
    old = master.workers()
    pid, session = first_session(context)
    master.signal(signal.SIGHUP)
    master.wait_workers(2, exclude=old, timeout=20)
    wait_for(lambda: not set(old) & set(children_of(master.pid)), 15, message="the old generation's exit")
    resumed_at(context, session, set(old))


def test_tls_in_share_mode_and_a_redirect_from_a_plain_listener(baton, port, pki):
    cert, key = pki.issue("a.test", ["a.test"])
    plain = free_port()
    master = baton(f"""
        [listeners.web]
        bind = "127.0.0.1:{port}"
        mode = "share"
        tls = true

        [listeners.plain]
        bind = "127.0.0.1:{plain}"
        redirect_https = {port}

        [apps.a]
        module = "tests.apps.tlsprobe:app"
        listeners = ["web", "plain"]
        chdir = "{REPO}"
        certificate = "{cert}"
        private_key = "{key}"
    """)
    master.wait_workers(1)
    status, _, body, cert_seen = get(port, "a.test", client_context(pki))
    assert status == 200 and body["tls"]["HTTPS"] == "on" and common_name(cert_seen) == "a.test"
    status, headers, _ = http_request(plain, "/some/path?x=1", headers={"Host": f"a.test:{plain}"})
    assert status == 308
    assert headers["Location"] == f"https://a.test:{port}/some/path?x=1"
    assert "listening on https://127.0.0.1:" in master.log()


def test_a_slow_handshake_holds_up_no_one(baton, port, pki):
    """A client that sends half a ClientHello and stops blocks no other client of the
    worker (one worker, one thread)."""
    cert, key = pki.issue("a.test", ["a.test"])
    master = baton(one_app_config(port, cert, key, listener='mode = "share"', app="header_timeout = 30"))
    master.wait_workers(1)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    hello = client_context(pki).wrap_bio(incoming, outgoing, server_hostname="a.test")
    with pytest.raises(ssl.SSLWantReadError):
        hello.do_handshake()
    data = outgoing.read()
    with socket.create_connection(("127.0.0.1", port)) as stalled:
        stalled.sendall(data[: len(data) // 2])
        # (Served while the stalled handshake waits for its 30 s deadline; the client's
        # own timeout, 10 s, would fail this if the worker were stuck on it.)
        assert get(port, "a.test", client_context(pki))[0] == 200


@pytest.mark.parametrize("mode", ["balance", "share", "reuseport"])
def test_tls_after_a_proxy_protocol_header_in_every_mode(baton, port, pki, mode):
    """The PROXY header comes in the clear, then the handshake: the app sees the
    header's client and https."""
    cert, key = pki.issue("a.test", ["a.test"])
    master = baton(f"""
        [listeners.web]
        bind = "127.0.0.1:{port}"
        mode = "{mode}"
        tls = true
        proxy_protocol = true

        [apps.a]
        module = "tests.apps.tlsprobe:app"
        listeners = ["web"]
        chdir = "{REPO}"
        certificate = "{cert}"
        private_key = "{key}"
    """)
    master.wait_workers(1)
    context = client_context(pki)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    raw.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 4711 443\r\n")
    with context.wrap_socket(raw, server_hostname="a.test") as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    found = json.loads(body)
    assert found["remote"] == "203.0.113.7" and found["tls"]["HTTPS"] == "on"
