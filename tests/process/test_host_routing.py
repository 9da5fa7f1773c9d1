"""Host routing holds for every request of a keep-alive connection (real processes).

The balancer routes a connection by its first request's Host; the worker checks each
request after it against the same routing, and answers one for another app with 421
and a close, so app A never serves (or sees) app B's requests."""
import json
import os
import socket

from conftest import REPO, wait_for


def _config(port: int, a_hosts: str = '["a.example"]') -> str:
    return f"""
    [master]
    graceful_timeout = 5

    [listeners.web]
    bind = "127.0.0.1:{port}"

    [apps.a]
    module = "tests.apps.probe:app"
    chdir = "{REPO}"
    listeners = ["web"]
    hosts = {a_hosts}
    env = {{ PROBE_VALUE = "A" }}

    [apps.b]
    module = "tests.apps.probe:app"
    chdir = "{REPO}"
    listeners = ["web"]
    hosts = ["b.example"]
    env = {{ PROBE_VALUE = "B" }}
    """


class Client:
    """One keep-alive connection, read response by response (Content-Length bodies)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def get(self, host: str, path: str = "/") -> tuple[int, dict, bytes]:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        size = int(headers["content-length"])
        while len(self.buf) < size:
            self._more()
        body, self.buf = self.buf[:size], self.buf[size:]
        return int(lines[0].split()[1]), headers, body

    def closed_by_server(self) -> bool:
        return self.buf == b"" and self.sock.recv(1) == b""

    def _more(self) -> None:
        data = self.sock.recv(65536)
        assert data, "the server closed the connection"
        self.buf += data

    def close(self) -> None:
        self.sock.close()


def _app_of(response) -> str:
    status, _, body = response
    assert status == 200, response
    return json.loads(body)["env"]


def test_a_request_for_another_host_on_a_keep_alive_connection_is_421_and_closed(baton, port, scratch):
    b = baton(_config(port))
    b.wait_workers(2)
    client = Client(port)
    try:
        assert _app_of(client.get("a.example")) == "A"
        assert _app_of(client.get("a.example")) == "A"   # the same host goes on as before
        seen = scratch / "a-saw-it"
        status, headers, body = client.get("b.example", f"/?mark={seen}")
        assert status == 421 and headers["connection"] == "close", (status, headers, body)
        assert client.closed_by_server()
        assert not seen.exists()   # no app ran it: probe marks every request it serves
    finally:
        client.close()
    b.wait_log("421 to")
    fresh = Client(port)
    try:
        assert _app_of(fresh.get("b.example")) == "B"
        status, _, _ = fresh.get("a.example")
        assert status == 421 and fresh.closed_by_server()
    finally:
        fresh.close()


def test_a_routing_change_reaches_the_workers_it_does_not_restart(baton, port):
    b = baton(_config(port))
    [a_worker, b_worker] = sorted(b.wait_workers(2))
    temp = b.config.with_name("baton.toml.new")
    temp.write_text(_config(port, '["a.example", "a2.example"]'))
    b.wait_log("is watching for changes")
    os.replace(temp, b.config)   # hosts change: no app restarts, the workers are told
    b.wait_log("reload: ", timeout=15)

    def a2_served_by_a():
        client = Client(port)
        try:
            return _app_of(client.get("a2.example")) == "A"
        except AssertionError:
            return False
        finally:
            client.close()
    wait_for(a2_served_by_a, timeout=15, message=lambda: f"a2.example served by A; log:\n{b.log()}")
    client = Client(port)
    try:   # and a2.example is A's on a connection that began with another of A's hosts
        assert _app_of(client.get("a.example")) == "A"
        assert _app_of(client.get("a2.example")) == "A"
        assert client.get("b.example")[0] == 421
    finally:
        client.close()
    assert sorted(b.wait_workers(2)) == [a_worker, b_worker]   # nobody restarted
