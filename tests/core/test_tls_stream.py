"""The worker's TLS transport (`http.tls.TLSStream`) over real socket pairs, its ticket
keys (`http.tickets`) and what the app's environ says of the client's certificate."""
from __future__ import annotations

import os
import socket
import ssl

import pytest
from tlscerts import Authority

from supervisor.http import tickets
from supervisor.http import tls as http_tls
from supervisor.system.loop import READ, WRITE


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = Authority(directory)
    cert, key = ca.issue("a.test", ["a.test"])
    client = ca.issue("client-1", client=True, serial=0x1F)
    return ca, cert, key, client


def server_context(pki, tmp_path, ca_file=None, min_version="1.2", secret=b""):
    ca, cert, key, _ = pki
    material, ca_fd = http_tls.write_material(str(cert), str(key), ca_file)
    return http_tls.context_for(material, ca_fd, min_version)


def client_context(pki, cert=None, max_version=None):
    ca = pki[0]
    context = ssl.create_default_context(cafile=str(ca.cert))
    if cert is not None:
        context.load_cert_chain(*map(str, cert))
    if max_version is not None:
        context.maximum_version = max_version
    return context


class Pair:
    """A server TLSStream and a non-blocking client SSLSocket over a socketpair with
    small buffers, driven by hand (no thread, no sleep)."""

    def __init__(self, server_ctx, client_ctx, session=None, buffer=4096):
        left, right = socket.socketpair()
        for sock in (left, right):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
            sock.setblocking(False)
        self.server = http_tls.TLSStream(left, server_ctx)
        self.client = client_ctx.wrap_socket(right, server_hostname="a.test", do_handshake_on_connect=False,
                                             session=session)

    def handshake(self):
        server_done = client_done = False
        for _ in range(200):
            if not server_done:
                server_done = self.server.handshake() == 0
            if not client_done:
                try:
                    self.client.do_handshake()
                    client_done = True
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
            if server_done and client_done:
                return
        raise AssertionError("the handshake did not finish")

    def client_read_all(self, size: int) -> bytes:
        got = bytearray()
        while len(got) < size:
            try:
                got += self.client.recv(65536)
            except ssl.SSLWantReadError:
                return bytes(got)
        return bytes(got)

    def close(self):
        self.server.close()
        self.client.close()


def test_a_handshake_then_requests_both_ways(pki, tmp_path):
    pair = Pair(server_context(pki, tmp_path), client_context(pki))
    try:
        with pytest.raises(BlockingIOError):
            pair.server.recv()   # nothing yet: the handshake comes first, and waits for the client
        pair.handshake()
        assert pair.server.obj.selected_alpn_protocol() is None   # the client offered none
        pair.client.sendall(b"GET / HTTP/1.1\r\n\r\n" * 3)
        assert pair.server.recv() == b"GET / HTTP/1.1\r\n\r\n" * 3
        with pytest.raises(BlockingIOError):
            pair.server.recv()
        assert pair.server.send(b"HTTP/1.1 200 OK\r\n\r\n") == 19
        assert pair.client_read_all(19) == b"HTTP/1.1 200 OK\r\n\r\n"
    finally:
        pair.close()


def test_a_send_the_socket_cannot_take_counts_only_what_is_on_the_wire(pki, tmp_path):
    """The retry rule: a record the kernel took part of is not counted, the next send
    starts with those bytes, and the client gets every byte once, in order."""
    pair = Pair(server_context(pki, tmp_path), client_context(pki))
    try:
        pair.handshake()
        data = bytes(range(256)) * 4096   # 1 MiB, far past the buffers
        outbuf = bytearray(data)
        received = bytearray()
        blocked = 0
        for _ in range(100000):
            if not outbuf:
                break
            try:
                sent = pair.server.send(outbuf)
                assert 0 < sent <= len(outbuf)
                del outbuf[:sent]
            except BlockingIOError:
                blocked += 1
            received += pair.client_read_all(1 << 30)
        received += pair.client_read_all(1 << 30)
        assert blocked > 0   # the buffers made it wait
        assert bytes(received) == data
    finally:
        pair.close()


def test_the_end_of_the_stream_is_an_empty_read(pki, tmp_path):
    pair = Pair(server_context(pki, tmp_path), client_context(pki))
    try:
        pair.handshake()
        pair.client.sendall(b"last words")
        pair.client.shutdown(socket.SHUT_WR)   # an EOF without close_notify: the same end
        assert pair.server.recv() == b"last words"
        assert pair.server.recv() == b""
    finally:
        pair.close()


def test_the_handshake_says_which_way_it_waits(pki, tmp_path):
    pair = Pair(server_context(pki, tmp_path), client_context(pki))
    try:
        assert pair.server.handshake() == READ   # no ClientHello yet
        with pytest.raises(ssl.SSLWantReadError):
            pair.client.do_handshake()
        assert pair.server.handshake() == READ   # its flight sent, it waits for the client's
        stuffed = Pair(server_context(pki, tmp_path), client_context(pki), buffer=1024)
        try:
            with pytest.raises(ssl.SSLWantReadError):
                stuffed.client.do_handshake()
            assert stuffed.server.handshake() in (READ, WRITE)
        finally:
            stuffed.close()
    finally:
        pair.close()


def test_garbage_instead_of_a_client_hello_fails_the_handshake(pki, tmp_path):
    left, right = socket.socketpair()
    left.setblocking(False)
    stream = http_tls.TLSStream(left, server_context(pki, tmp_path))
    right.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(ssl.SSLError):
        stream.handshake()
    stream.close()
    right.close()


def test_a_client_certificate_reaches_the_environ(pki, tmp_path):
    ca, _, _, client = pki
    pair = Pair(server_context(pki, tmp_path, ca_file=str(ca.cert)), client_context(pki, client))
    try:
        pair.handshake()
        environ = http_tls.tls_environ(pair.server.obj)
        assert environ["HTTPS"] == "on" and environ["wsgi.url_scheme"] == "https"
        assert environ["SSL_CLIENT_VERIFY"] == "SUCCESS"
        assert environ["SSL_CLIENT_S_DN"] == "CN=client-1,O=Baton Tests"
        assert environ["SSL_CLIENT_I_DN"] == "CN=Baton Test CA,O=Baton Tests"
        assert environ["SSL_CLIENT_SERIAL"] == "1F"
        assert environ["SSL_CLIENT_CERT"] == ssl.DER_cert_to_PEM_cert(pair.client.getpeercert(True) and
                                                                    pair.server.obj.getpeercert(True))
    finally:
        pair.close()


@pytest.mark.parametrize("rdns, expected", [
    ((), ""),
    (((("commonName", "a"),),), "CN=a"),
    (((("countryName", "FR"),), (("organizationName", "Acme, Inc."),), (("commonName", "x"),)),
     "CN=x,O=Acme\\, Inc.,C=FR"),
    (((("commonName", "a"), ("emailAddress", "a@b")),), "CN=a+emailAddress=a@b"),
    (((("commonName", " lead#"),),), "CN=\\ lead#"),
    (((("commonName", "#x+y"),),), "CN=\\#x\\+y"),
    (((("1.2.3.4", "v"),),), "1.2.3.4=v"),
])
def test_distinguished_names_are_rfc2253(rdns, expected):
    assert http_tls.distinguished_name(rdns) == expected


def test_no_client_certificate_is_verify_none():
    assert http_tls.client_environ(None, None) == {"SSL_CLIENT_VERIFY": "NONE"}


def test_material_never_passes_through_python_and_the_fds_are_closed(pki):
    ca, cert, key, _ = pki
    material, ca_fd = http_tls.write_material(str(cert), str(key), str(ca.cert))
    assert os.readlink(f"/proc/self/fd/{material}").startswith("/memfd:baton-tls")
    http_tls.context_for(material, ca_fd, "1.2")
    for fd in (material, ca_fd):
        with pytest.raises(OSError):
            os.fstat(fd)


# -- session tickets ------------------------------------------------------------------------


def test_ticket_keys_are_the_same_for_everyone_in_a_period_and_change_with_it():
    now = [7200.0 * 3 + 10]
    keys = http_tls.TicketKeys(b"s" * 32, clock=lambda: now[0], rotate_s=7200.0)
    same = http_tls.TicketKeys(b"s" * 32, clock=lambda: now[0], rotate_s=7200.0)
    other = http_tls.TicketKeys(b"t" * 32, clock=lambda: now[0], rotate_s=7200.0)
    assert len(keys.key(keys.period())) == 80
    assert keys.key(keys.period()) == same.key(same.period()) != other.key(other.period())
    assert keys.seconds_to_next() == 7190.0
    first = keys.key(keys.period())
    now[0] += 7200.0
    assert keys.key(keys.period()) != first and keys.key(keys.period())[:16] != first[:16]


def test_the_context_pointer_is_found_and_checked():
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    pointer = tickets.ssl_ctx_pointer(context)
    assert isinstance(pointer, int), pointer
    with pytest.raises(ValueError):
        tickets.set_ticket_key(context, b"short")


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_session_resumes_at_another_context_with_the_same_ticket_key(pki, tmp_path, version):
    keys = http_tls.TicketKeys(b"k" * 32)
    key = keys.key(keys.period())
    first, second, stranger = (server_context(pki, tmp_path) for _ in range(3))
    for context in (first, second):
        assert tickets.set_ticket_key(context, key) is None
    client = client_context(pki, max_version=version)

    def connect(server_ctx, session=None):
        pair = Pair(server_ctx, client, session=session, buffer=65536)
        pair.handshake()
        pair.client.sendall(b"ping")
        assert pair.server.recv() == b"ping"
        pair.server.send(b"pong")
        assert pair.client_read_all(4) == b"pong"   # (TLS 1.3's tickets come with it)
        return pair
    pair = connect(first)
    session = pair.client.session
    pair.close()
    resumed = connect(second, session)
    assert resumed.client.session_reused
    resumed.close()
    fresh = connect(stranger, session)   # OpenSSL's own random key: no resumption
    assert not fresh.client.session_reused
    fresh.close()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_after_a_rotation_the_previous_key_still_opens_its_tickets(pki, tmp_path, version):
    """The ticket callback: a ticket sealed in one period resumes in the next (and is
    renewed), not two periods later; a context with other keys cannot open it."""
    now = [3600.0 * 10]
    keys = http_tls.TicketKeys(b"r" * 32, clock=lambda: now[0])
    issuer, later = server_context(pki, tmp_path), server_context(pki, tmp_path)
    for context in (issuer, later):
        assert tickets.install_ticket_callback(context, keys.keys) is None
        assert tickets.has_ticket_callback(context)
    client = client_context(pki, max_version=version)

    def connect(server_ctx, session=None):
        pair = Pair(server_ctx, client, session=session, buffer=65536)
        pair.handshake()
        pair.client.sendall(b"ping")
        assert pair.server.recv() == b"ping"
        pair.server.send(b"pong")
        assert pair.client_read_all(4) == b"pong"   # (TLS 1.3's tickets come with it)
        reused = pair.client.session_reused
        session = pair.client.session
        pair.close()
        return reused, session
    _, session = connect(issuer)
    now[0] += 3600.0   # the next hour: its key seals, the previous one still opens
    reused, renewed = connect(later, session)
    assert reused
    now[0] += 3600.0   # two hours on: the first ticket's key is gone, the renewed one's is not
    assert connect(later, session)[0] is False
    assert connect(later, renewed)[0] is True
