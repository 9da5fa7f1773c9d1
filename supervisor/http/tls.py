"""TLS in the worker: one app's context, and connections that speak TLS on the loop.

The master never gives a worker a path to its key (the worker's user may not be able
to open it): the forked child, still root, copies the key and the certificate chain
into a memfd (`write_material`), which the new interpreter loads through
``/proc/self/fd/N`` and closes (`context_for`). So the key is read by OpenSSL alone;
no Python object ever holds its bytes, in the master or the worker, and no other
app's worker or the balancer ever has the fd.

`TLSStream` is what the server's code sees instead of a socket for a TLS connection:
``recv``, ``send``, ``fileno``, ``close``, all non-blocking, over an ``ssl.SSLObject``
and two ``MemoryBIO``s (so a slow handshake or a slow reader blocks no one). Promises:

* ``recv`` returns every byte of plaintext that the ciphertext read so far holds
  (never leaving decrypted bytes inside OpenSSL while the socket is quiet), b"" at the
  end of the stream (close_notify or EOF), or raises BlockingIOError when none is here.
* ``send`` has OpenSSL's retry rule, which is also how the server already resends
  what a socket did not take: it returns how many bytes are on the wire (or raises
  BlockingIOError for none); a record the kernel took only part of is kept, and the
  next ``send`` must start with the bytes not counted (the server's outbuf does).
  So nothing is ever counted as sent while some of it waits in our buffer, and a
  server that sees its output all sent may wait for reading alone.
* ``handshake`` drives the handshake as far as the socket allows and says which way
  it must wait (READ, WRITE) or 0 when it is done.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import ssl
import time

from supervisor.http.connection import ClientConnection
from supervisor.system.loop import READ, WRITE

MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}   # config.tls.TLS_VERSIONS

RECORD_BYTES = 16384          # a TLS record's most plaintext: what one write encrypts
SEND_LIMIT = 1 << 18          # plaintext encrypted per send call (the loop goes round meanwhile)
RECV_BYTES = 65536
ALPN = ("http/1.1",)
TICKET_ROTATE_S = 3600.0      # a new session-ticket key every hour (wall clock: shared by processes)


class EncryptedKey(Exception):
    """The key asks for a password; no one is there to type it."""


def _no_password() -> str:
    raise EncryptedKey("the private key is encrypted; expected an unencrypted PEM key")


# -- in the master's forked child, as root ------------------------------------------------

def write_material(certificate: str, private_key: str, client_ca: str | None) -> tuple[int, int]:
    """memfds holding the key and the chain (one file, as load_cert_chain reads it),
    and the client CAs (-1 without); copied by the kernel, never through a Python
    buffer. Raises OSError (the files are unreadable); the caller owns the fds."""
    material = _memfd("baton-tls")
    try:
        _copy_into(material, private_key)
        os.write(material, b"\n")   # a key file without its final newline would join the next line
        _copy_into(material, certificate)
        ca = -1
        if client_ca is not None:
            ca = _memfd("baton-tls-ca")
            _copy_into(ca, client_ca)
    except BaseException:
        os.close(material)
        raise
    return material, ca


def _memfd(name: str) -> int:
    return os.memfd_create(name, os.MFD_CLOEXEC)


def _copy_into(memfd: int, path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while os.sendfile(memfd, fd, None, 1 << 20):
            pass
    finally:
        os.close(fd)


# -- in the worker -------------------------------------------------------------------------

def context_for(material_fd: int, ca_fd: int, min_version: str, ticket_secret: bytes = b"",
                clock=time.time, log=None) -> ssl.SSLContext:
    """The app's server context, from the memfds `write_material` made (closed here,
    whatever happens). OpenSSL's default ciphers, ALPN http/1.1, no renegotiation; with
    client CAs a client certificate is required. With `ticket_secret`, session tickets
    are sealed with keys every worker of the app derives alike (see `TicketKeys`)."""
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = MIN_VERSIONS[min_version]
        context.set_ciphers("DEFAULT")
        context.options |= ssl.OP_NO_RENEGOTIATION
        context.load_cert_chain(f"/proc/self/fd/{material_fd}", password=_no_password)
        context.set_alpn_protocols(list(ALPN))
        context.sni_callback = _note_server_name
        if ca_fd >= 0:
            context.load_verify_locations(cafile=f"/proc/self/fd/{ca_fd}")
            context.verify_mode = ssl.CERT_REQUIRED
    finally:
        for fd in (material_fd, ca_fd):
            if fd >= 0:
                os.close(fd)
    return context


def _note_server_name(obj, name, context) -> None:
    """The SNI the client sent, kept for the environ's SSL_TLS_SNI (mod_ssl's name)."""
    obj.baton_sni = name


class TicketKeys:
    """Session-ticket keys for one app, the same in each of its workers and generations:
    derived from the app's secret (the master's, per app) and the wall clock's hour, so
    a client resumes at any worker. Given to OpenSSL through `supervisor.http.tickets`;
    when that cannot be done, each worker keeps OpenSSL's own random keys (resumption
    at the same worker only) and says so once."""

    def __init__(self, secret: bytes, clock=time.time, rotate_s: float = TICKET_ROTATE_S):
        self.secret = secret
        self.clock = clock
        self.rotate_s = rotate_s
        self._cached: tuple[int, list[bytes]] | None = None

    def period(self) -> int:
        return int(self.clock() // self.rotate_s)

    def key(self, period: int) -> bytes:
        """The 80 bytes OpenSSL takes: a 16-byte name, a 32-byte HMAC key, a 32-byte AES key."""
        label = b"baton session tickets %d" % period
        name = hmac.new(self.secret, b"name " + label, hashlib.sha256).digest()[:16]
        keys = hmac.new(self.secret, b"keys " + label, hashlib.sha512).digest()
        return name + keys

    def seconds_to_next(self) -> float:
        return (self.period() + 1) * self.rotate_s - self.clock()

    def keys(self) -> list[bytes]:
        """This period's key (which seals new tickets), then the previous one's (which
        still opens the tickets it sealed)."""
        period = self.period()
        if self._cached is None or self._cached[0] != period:
            self._cached = (period, [self.key(period), self.key(period - 1)])
        return self._cached[1]


class TLSStream:
    """A connected socket as the server sees it, TLS inside (see the module's promises)."""

    __slots__ = ("raw", "obj", "incoming", "outgoing", "pending", "retry", "done")

    def __init__(self, raw, context: ssl.SSLContext) -> None:
        self.raw = raw
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.pending = b""   # ciphertext the kernel has not taken yet
        self.retry = 0       # plaintext bytes of the record in `pending` (the next send starts with them)
        self.done = False    # the handshake is over

    def fileno(self) -> int:
        return self.raw.fileno()

    def feed(self, ciphertext: bytes) -> None:
        """Bytes of the connection that another process read already."""
        if ciphertext:
            self.incoming.write(ciphertext)

    def handshake(self) -> int:
        """0 when the handshake is done; else READ or WRITE, what it waits for.
        Raises ssl.SSLError (or OSError) when it failed."""
        while True:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                if not self._flush():
                    return WRITE
                if not self._fill():
                    return READ
                continue
            if not self._flush():   # its last flight, and TLS 1.3's session tickets
                return WRITE
            self.done = True
            return 0

    def recv(self, size: int = RECV_BYTES) -> bytes:
        """(`size` is for the socket API only: all the plaintext here is returned.)"""
        chunks = []
        obj = self.obj
        while True:
            try:
                data = obj.read(RECV_BYTES)
            except ssl.SSLWantReadError:
                # With something to return, the socket is not asked again: what it may
                # hold still makes it readable (the loop watches it level-triggered).
                if chunks or not self._fill():
                    break
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                data = b""
            if not data:   # the end: close_notify, or an EOF without it
                if chunks:
                    break   # it shows at the next call (the socket stays readable at EOF)
                return b""
            chunks.append(data)
        if self.outgoing.pending and not self.pending:
            self._flush()   # what reading made OpenSSL say (a key update's answer)
        if not chunks:
            raise BlockingIOError("no TLS record is complete yet")
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def send(self, data) -> int:
        if self.pending and not self._flush():
            raise BlockingIOError("the socket has not taken the last TLS record")
        done, self.retry = self.retry, 0   # their record is on the wire now
        view = memoryview(data)
        total = len(view)
        while done < total and done < SEND_LIMIT:
            chunk = view[done:done + RECORD_BYTES]
            self.obj.write(chunk)
            if not self._flush():
                self.retry = len(chunk)
                break
            done += len(chunk)
        if not done:
            raise BlockingIOError("the socket took only part of a TLS record")
        return done

    def close(self) -> None:
        """Say close_notify if the socket takes it at once, then close."""
        if self.done and self.raw.fileno() >= 0 and not self.pending:
            try:
                self.obj.unwrap()
            except (ssl.SSLError, ValueError):
                pass
            try:
                self._flush()
            except OSError:
                pass
        self.raw.close()

    def setblocking(self, flag: bool) -> None:
        self.raw.setblocking(flag)

    # -- moving ciphertext -----------------------------------------------------------

    def _fill(self) -> bool:
        """Read ciphertext from the socket into OpenSSL; False if none was there."""
        try:
            data = self.raw.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return False
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()
        return True

    def _flush(self) -> bool:
        """Give the kernel the ciphertext OpenSSL wrote; False if some must wait."""
        out = self.pending + self.outgoing.read() if self.outgoing.pending else self.pending
        if not out:
            return True
        try:
            sent = self.raw.send(out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        self.pending = out[sent:]
        return not self.pending


class TLSConnection(ClientConnection):
    """A connection that speaks TLS: ``sock`` is its `TLSStream` once the handshake
    starts (a PROXY header comes before it, in the clear). A file response is read
    and sent through TLS: the kernel cannot encrypt a sendfile."""

    __slots__ = ()

    def sendfile(self, fileobj, offset: int, count: int) -> int | None:
        data = os.pread(fileobj.fileno(), min(count, SEND_LIMIT), offset)
        if not data:
            return 0
        try:
            return self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return None


# -- what the app sees -----------------------------------------------------------------------

_DN_NAMES = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
             "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
             "domainComponent": "DC", "streetAddress": "street", "userId": "UID",
             "emailAddress": "emailAddress", "serialNumber": "serialNumber"}


def distinguished_name(rdns) -> str:
    """An RFC 2253 string (nginx's ``$ssl_client_s_dn``) from ``getpeercert()``'s
    subject or issuer: the last RDN first, special characters escaped."""
    parts = []
    for rdn in reversed(rdns or ()):
        parts.append("+".join(f"{_DN_NAMES.get(name, name)}={_escape_dn(value)}" for name, value in rdn))
    return ",".join(parts)


def _escape_dn(value: str) -> str:
    out = []
    for index, char in enumerate(value):
        if char in ',+"\\<>;' or (char == "#" and index == 0) or (char == " " and index in (0, len(value) - 1)):
            out.append("\\" + char)
        else:
            out.append(char)
    return "".join(out)


def tls_environ(obj: ssl.SSLObject) -> dict[str, str]:
    """What a handshake that is done adds to every environ of its connection, named as
    Apache's mod_ssl and nginx name them."""
    environ = {"HTTPS": "on", "wsgi.url_scheme": "https"}
    version = obj.version()
    if version:
        environ["SSL_PROTOCOL"] = version
    cipher = obj.cipher()
    if cipher:
        environ["SSL_CIPHER"] = cipher[0]
    sni = getattr(obj, "baton_sni", None)
    if sni:
        environ["SSL_TLS_SNI"] = sni
    environ.update(client_environ(obj.getpeercert(), obj.getpeercert(binary_form=True)))
    return environ


def client_environ(cert: dict | None, der: bytes | None) -> dict[str, str]:
    """The SSL_CLIENT_* variables for a verified client certificate (``cert`` as
    ``getpeercert()`` gives it, ``der`` its bytes); only SSL_CLIENT_VERIFY = "NONE"
    without one."""
    if not cert or not der:
        return {"SSL_CLIENT_VERIFY": "NONE"}
    return {
        "SSL_CLIENT_VERIFY": "SUCCESS",
        "SSL_CLIENT_S_DN": distinguished_name(cert.get("subject")),
        "SSL_CLIENT_I_DN": distinguished_name(cert.get("issuer")),
        "SSL_CLIENT_SERIAL": str(cert.get("serialNumber", "")),
        "SSL_CLIENT_CERT": ssl.DER_cert_to_PEM_cert(der),
    }
