"""PEP 3333 glue: the environ, ``wsgi.input``, ``start_response`` and running an app.

Nothing here touches a socket: :func:`run_app` is given a ``send(bytes)`` callable
(and a ``sendfile(file, offset, count)`` one for ``wsgi.file_wrapper`` objects) and
an :class:`~supervisor.http11.Connection` to frame the response. Promises:

* the application's ``close()`` is always called;
* a status or header the application returns is validated (no CR, LF, NUL, no
  hop-by-hop framing) before one byte goes out: a bad one becomes a 500, never a
  split or smuggled response;
* an exception becomes a 500 with the traceback in the error log, never in the
  response; if the head was already sent the connection must be closed
  (:attr:`Outcome.must_close`).
"""

from __future__ import annotations

import functools
import io
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from urllib.parse import unquote_to_bytes

from supervisor.http.forwarded import DEFAULT_SECURE_SCHEME_HEADERS, ForwardedTrust
from supervisor.http.protocol import (
    Connection,
    LocalProtocolError,
    RenderedHead,
    Request,
    render_head,
)

__all__ = ["EnvironBuilder", "Input", "BadRequestBody", "FileWrapper", "Outcome", "RecordingOutcome", "ResponseStream",
           "run_app", "valid_status", "valid_header"]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_STATUS = re.compile(r"[1-5][0-9][0-9] [\t\x20-\x7e\x80-\xff]*")


def valid_status(status) -> bool:
    return type(status) is str and _STATUS.fullmatch(status) is not None


def valid_header(name, value) -> bool:
    return (type(name) is str and type(value) is str
            and _TOKEN.fullmatch(name) is not None and _FIELD_VALUE.fullmatch(value) is not None)


@functools.lru_cache(maxsize=256)
def _checked_head(status: str, headers: tuple) -> RenderedHead:
    """Check what an application gave start_response, and render it.

    Memoised: applications answer with few distinct heads, and this is pure (keys
    compare by value: an equal str or tuple passes or fails the same checks; an error
    is never cached). The cache is bounded; a miss costs what checking costs."""
    if not valid_status(status):
        raise LocalProtocolError(500, f"invalid status from application: {status!r}")
    for item in headers:
        if type(item) is not tuple or len(item) != 2 or not valid_header(*item):
            raise LocalProtocolError(500, f"invalid header from application: {item!r}")
    return render_head(status, headers)


_PERCENT = ord("%")   # `37 in path` is a memchr; `b"%" in path` raises and clears a TypeError first
_SERVER_PROTOCOLS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0"}


def _environ_key(name: bytes) -> tuple[str, bool]:
    """CGI key for a header name, and whether it is a proxy (forwarded) header
    (callers look in _ENVIRON_KEYS first)."""
    key = name.decode("latin-1").upper().replace("-", "_")
    if key == "CONTENT_TYPE" or key == "CONTENT_LENGTH":
        found = key, False
    else:
        found = "HTTP_" + key, key.startswith(("X_FORWARDED_", "X_REAL")) or key == "FORWARDED"
    if len(_ENVIRON_KEYS) < _ENVIRON_KEYS_MAX:
        _ENVIRON_KEYS[name] = found
    return found


# Memo of _environ_key, a pure function: clients send few distinct header names. A
# plain dict, as lru_cache builds a key tuple per call for a bytes argument; bounded
# by refusing new names when full (a miss costs what computing costs).
_ENVIRON_KEYS: dict[bytes, tuple[str, bool]] = {}
_ENVIRON_KEYS_MAX = 512


class BadRequestBody(OSError):
    """What ``wsgi.input`` raises when the body it reads breaks the protocol (a bad
    chunk, or one past ``max_body_size``): the client's doing, so an OSError, as for a
    client that went away. The application's response is not sent; the server answers
    400 (413) and closes."""


class Input:
    """``wsgi.input`` over a body that arrives while the application reads it.

    ``pull()`` returns the next piece of body, ``b""`` at its end (and from then on
    nothing more is pulled); it is first called when the application first reads past
    ``prefix`` (the part of the body already here), which is when the server sends
    an interim 100 Continue. Reads follow a binary file's: ``read(n)`` returns ``n``
    bytes unless the body ends first, ``read()`` the rest, ``readline`` up to and with
    a newline; an error of ``pull`` (an OSError: the client's doing) reaches the
    caller, with what was read before it kept for the next read. What it holds is
    what the application asked for, plus one piece.
    """

    def __init__(self, pull: Callable[[], bytes], prefix: bytes = b"") -> None:
        self._pull = pull
        self._buf = bytearray(prefix)   # read from the body, not yet by the application
        self._done = False

    def _fill(self) -> bool:
        if self._done:
            return False
        data = self._pull()
        if not data:
            self._done = True
            return False
        self._buf += data
        return True

    def read(self, size: int | None = -1) -> bytes:
        buf = self._buf
        if size is None or size < 0:
            parts = [bytes(buf)]
            buf.clear()
            try:
                while not self._done:
                    data = self._pull()
                    if not data:
                        self._done = True
                    parts.append(data)
            except BaseException:
                buf += b"".join(parts)
                raise
            return b"".join(parts)
        while len(buf) < size and self._fill():
            pass
        data = bytes(buf[:size])
        del buf[:size]
        return data

    def readline(self, size: int | None = -1) -> bytes:
        buf = self._buf
        searched = 0
        while True:
            end = buf.find(b"\n", searched) + 1
            if end or (size is not None and 0 <= size <= len(buf)):
                break
            searched = len(buf)
            if not self._fill():
                break
        if not end:
            end = len(buf)
        if size is not None and 0 <= size < end:
            end = size
        data = bytes(buf[:end])
        del buf[:end]
        return data

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        lines, total = [], 0
        while True:
            line = self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                return lines

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def close(self) -> None:
        pass


class FileWrapper:
    """``wsgi.file_wrapper``: the server sends these with ``os.sendfile``."""

    def __init__(self, filelike, blksize: int = 65536) -> None:
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def fileno(self) -> int | None:
        try:
            return self.filelike.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation):
            return None

    def __iter__(self):
        # The fallback when sendfile cannot be used (no real file descriptor).
        read = self.filelike.read
        while True:
            data = read(self.blksize)
            if not data:
                return
            yield data


class EnvironBuilder:
    """Builds environs for one listener; everything constant is computed once."""

    def __init__(self, *, server_name: str, server_port: str, url_scheme: str = "http",
                 errors=None, multithread: bool = False,
                 forwarded_allow_ips: tuple[str, ...] = ("127.0.0.1", "::1"),
                 forwarded_header: str = "x-forwarded-for",
                 secure_scheme_headers: Mapping[str, str] = DEFAULT_SECURE_SCHEME_HEADERS) -> None:
        self.forwarded = ForwardedTrust(forwarded_allow_ips, forwarded_header, secure_scheme_headers)
        # Scheme headers the proxy-header test in build_from does not catch (custom names).
        self._scheme_keys = frozenset(key for key in self.forwarded.keys
                                      if not key.startswith(("HTTP_X_FORWARDED_", "HTTP_X_REAL"))
                                      and key != "HTTP_FORWARDED")
        self._base = {
            "SCRIPT_NAME": "",
            "SERVER_NAME": server_name,
            "SERVER_PORT": server_port,
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": url_scheme,
            "wsgi.errors": errors if errors is not None else sys.stderr,
            "wsgi.multithread": multithread,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
            "wsgi.file_wrapper": FileWrapper,
        }

    def connection_base(self, peer) -> dict:
        """What the environs of one connection from ``peer`` share: built once per
        connection, for :meth:`build_from`."""
        base = self._base.copy()
        if type(peer) is tuple:
            base["REMOTE_ADDR"] = peer[0]
            base["REMOTE_PORT"] = str(peer[1])
        else:
            base["REMOTE_ADDR"] = str(peer or "")
        return base

    def build_from(self, base: dict, request: Request, wsgi_input) -> dict:
        raw_uri = request.target.decode("latin-1")
        path = request.path
        if path == request.target and "%" not in raw_uri:   # nothing to split or decode
            path_info = raw_uri
            query = ""
        else:
            if _PERCENT in path:
                path = unquote_to_bytes(path)
            path_info = path.decode("latin-1")
            query = request.query.decode("latin-1")
        environ = base.copy()   # a copy is a memcpy; a {**base, ...} display is not
        environ["REQUEST_METHOD"] = request.method.decode("latin-1")
        environ["PATH_INFO"] = path_info
        environ["QUERY_STRING"] = query
        environ["RAW_URI"] = raw_uri
        environ["SERVER_PROTOCOL"] = _SERVER_PROTOCOLS[request.version]
        environ["wsgi.input"] = wsgi_input
        forwarded = False
        for name, value in request.headers:
            key, proxied = _ENVIRON_KEYS.get(name) or _environ_key(name)
            if proxied:
                forwarded = True
            if key in environ:
                environ[key] += ", " + value.decode("latin-1")
            else:
                environ[key] = value.decode("latin-1")
        if request.chunked and "CONTENT_LENGTH" not in environ:
            # The body was de-chunked for the application; wsgi.input ends with it.
            environ["wsgi.input_terminated"] = True
        if forwarded or (self._scheme_keys and not self._scheme_keys.isdisjoint(environ)):
            self._apply_forwarded(environ)
        return environ

    def _apply_forwarded(self, environ: dict) -> None:
        """Believe the proxy headers of a trusted peer (see forwarded.py)."""
        self.forwarded.apply(environ)


class Outcome:
    """One request's response: ``start_response`` and ``write()`` for the application,
    and what happened, for the server and the access log."""

    __slots__ = ("status", "sent", "must_close", "head_sent", "conn", "request", "send",
                 "status_line", "rendered", "stream")

    def __init__(self, conn: Connection, request: Request, send) -> None:
        self.status = "500"     # the status code sent (access log)
        self.sent = 0           # body bytes sent
        self.must_close = False
        self.head_sent = False
        self.conn = conn
        self.request = request
        self.send = send
        self.status_line = None   # as the application gave it
        self.rendered = None      # its status and headers, checked and rendered
        self.stream = None        # the rest of the response, while it waits for the socket

    def start_response(self, status, headers, exc_info=None):
        if exc_info is not None:
            try:
                if self.head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None   # no reference cycle through the frame
        elif self.status_line is not None:
            raise AssertionError("start_response called twice without exc_info")
        if type(headers) is not list:
            raise LocalProtocolError(500, "response headers must be a list")
        # A snapshot: what was checked is what is sent.
        headers = tuple(headers)
        try:
            self.rendered = _checked_head(status, headers)
        except TypeError:   # an unhashable item or status
            self.rendered = _checked_head.__wrapped__(status, headers)
        self.status_line = status
        return self.write

    def send_head(self, hint: int | None) -> bytes:
        if self.status_line is None:
            raise LocalProtocolError(500, "application did not call start_response")
        head = self.conn.rendered_head(self.request, self.rendered, hint)
        self.head_sent = True
        self.status = self.status_line[:3]
        return head

    def write(self, data: bytes) -> None:
        if type(data) is not bytes:
            raise TypeError("write() needs bytes")
        out = b""
        if not self.head_sent:
            out = self.send_head(None)
        framed = self.conn.body(data)
        self.sent += len(data)
        self.send(out + framed if out else framed)


class RecordingOutcome(Outcome):
    """An :class:`Outcome` that also keeps, for an access log whose format shows them,
    the response headers the application gave (``headers``) and, set by the caller,
    the request's ``environ`` (read once the response is done, so what middleware
    added to it, such as ``REMOTE_USER``, is there). Plain ``Outcome`` keeps neither."""

    __slots__ = ("headers", "environ")

    def __init__(self, conn: Connection, request: Request, send) -> None:
        super().__init__(conn, request, send)
        self.headers = ()
        self.environ = None

    def start_response(self, status, headers, exc_info=None):
        write = super().start_response(status, headers, exc_info)
        self.headers = tuple(headers)   # what was checked, as Outcome snapshots it
        return write


_ERROR_BODY = b"Internal Server Error\n"


def run_app(app, environ: dict, conn: Connection, request: Request,
            send: Callable[[bytes], bool | None], error_log: logging.Logger,
            sendfile: Callable[[object, int, int], int | None] | None = None,
            outcome_type: type[Outcome] = Outcome) -> Outcome:
    """Call ``app`` and send its response through ``send``, as far as the socket takes it.

    ``send(data)`` takes every byte (sent, or kept in a buffer for later) or raises
    OSError; it returns a true value when some of them wait in that buffer, the sign
    that the socket is full. The response's iterable is then iterated no further: the
    rest is left in ``outcome.stream`` (a :class:`ResponseStream`) for the caller to
    `~ResponseStream.advance` once the buffer drained. A ``send`` that always returns
    None (one that blocks) gets the whole response before run_app returns.
    ``sendfile(file, offset, count)`` sends a file's bytes and returns how many went
    out (0: the file ended), or None when the socket is full. ``outcome_type`` is
    ``Outcome`` or :class:`RecordingOutcome`.
    """
    outcome = outcome_type(conn, request, send)
    result = None
    try:
        result = app(environ, outcome.start_response)
        if type(result) is list and len(result) == 1 and not outcome.head_sent:
            # The fast path: one bytes chunk, one send with a Content-Length.
            body = result[0]
            if type(body) is not bytes:
                raise TypeError(f"application returned {type(body).__name__}, not bytes")
            status = outcome.status_line
            if status is None:
                raise LocalProtocolError(500, "application did not call start_response")
            data = conn.whole_response(request, outcome.rendered, body)
            outcome.head_sent = True
            outcome.status = status[:3]
            outcome.sent = len(body)
            send(data)
            return outcome
        stream = ResponseStream(outcome, result, environ, error_log, sendfile)
        result = None   # the stream's to close, now or once the socket took the rest
        if not stream.advance():
            outcome.stream = stream
        return outcome
    except OSError:
        # The client went away (or the socket broke): nothing more can be sent.
        outcome.must_close = True
        return outcome
    except Exception:
        error_log.exception("Error handling request %s %s",
                            environ.get("REQUEST_METHOD"), environ.get("RAW_URI"))
        outcome.must_close = True
        if not outcome.head_sent:
            _send_error(conn, request, send, outcome)
        return outcome
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                error_log.exception("Error closing the application's response")
                outcome.must_close = True


class ResponseStream:
    """What is left of a response once the application returned: its iterable's
    chunks, or a ``wsgi.file_wrapper``'s file (sent with ``sendfile``), sent as the
    socket takes them.

    `advance()` sends until ``send`` says bytes wait in its buffer (or ``sendfile``
    that the socket is full) and returns False: call it again once that buffer is
    empty, never before (a file's bytes must not overtake the head). It returns True
    when the response is over, whole or cut short by an error (then
    ``outcome.must_close``, and a 500 if nothing went out yet), with the iterable
    closed (PEP 3333). `close()` abandons it: the iterable is closed, and the caller
    closes the connection. One thread at a time (the one that owns the connection).
    """

    __slots__ = ("outcome", "result", "environ", "error_log", "sendfile", "chunks", "file",
                 "offset", "remaining")

    def __init__(self, outcome: Outcome, result, environ: dict, error_log: logging.Logger,
                 sendfile) -> None:
        self.outcome = outcome
        self.result = result        # the application's iterable, until closed
        self.environ = environ
        self.error_log = error_log
        self.sendfile = sendfile
        self.chunks = None          # the iterator being sent, once started
        self.file = None            # or the file being sent with sendfile
        self.offset = 0             # file: where its next byte is
        self.remaining = 0          # file: bytes still to send

    def advance(self) -> bool:
        outcome = self.outcome
        try:
            if self.chunks is None and self.file is None and self._begin():
                return False
            if not (self._send_file() if self.file is not None else self._send_chunks()):
                return False
        except OSError:
            # The client went away (or the socket broke): nothing more can be sent.
            outcome.must_close = True
        except Exception:
            self.error_log.exception("Error handling request %s %s",
                                     self.environ.get("REQUEST_METHOD"), self.environ.get("RAW_URI"))
            outcome.must_close = True
            if not outcome.head_sent:
                _send_error(outcome.conn, outcome.request, outcome.send, outcome)
        except BaseException:
            self.close()
            raise
        self.close()
        return True

    def close(self) -> None:
        """Close the application's iterable (once; an error in it is logged)."""
        result, self.result = self.result, None
        self.chunks = self.file = None
        close = getattr(result, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                self.error_log.exception("Error closing the application's response")
                self.outcome.must_close = True

    def _begin(self) -> bool:
        """Choose how the body goes out; True when the head waits in ``send``'s buffer."""
        result = self.result
        if not (isinstance(result, FileWrapper) and self.sendfile is not None
                and result.fileno() is not None):
            self.chunks = iter(result)
            return False
        outcome = self.outcome
        conn = outcome.conn
        try:
            offset = result.filelike.tell()
        except (AttributeError, OSError):
            offset = 0
        count = max(0, os.fstat(result.fileno()).st_size - offset)
        head = outcome.send_head(count)
        if outcome.request.method == b"HEAD":
            self.chunks = iter(())
        elif conn.response_chunked:
            self.chunks = iter(result)   # read and framed: sendfile cannot frame chunks
        else:
            self.file = result.filelike
            self.offset = offset
            declared = conn.response_remaining
            self.remaining = count if declared is None else min(count, declared)
        return bool(outcome.send(head))

    def _send_chunks(self) -> bool:
        outcome = self.outcome
        conn, send = outcome.conn, outcome.send
        for chunk in self.chunks:
            if type(chunk) is not bytes:
                raise TypeError(f"application yielded {type(chunk).__name__}, not bytes")
            if not chunk:
                continue
            if not outcome.head_sent:
                waiting = send(outcome.send_head(None) + conn.body(chunk))
            else:
                waiting = send(conn.body(chunk))
            outcome.sent += len(chunk)
            if waiting:
                return False
        tail = b"" if outcome.head_sent else outcome.send_head(0)
        tail += conn.end_of_response()
        if tail:
            send(tail)   # may wait in the buffer: the caller sends it before anything else
        return True

    def _send_file(self) -> bool:
        outcome = self.outcome
        conn, sendfile = outcome.conn, self.sendfile
        while self.remaining > 0:
            n = sendfile(self.file, self.offset, self.remaining)
            if n is None:
                return False
            if n <= 0:
                break   # the file is shorter than it was: end_of_response closes
            self.offset += n
            self.remaining -= n
            conn.count_body(n)
            outcome.sent += n
        conn.end_of_response()
        return True


def _send_error(conn: Connection, request: Request, send, outcome: Outcome) -> None:
    head = conn.response_head(request, "500 Internal Server Error",
                              [("Content-Type", "text/plain"), ("Connection", "close")],
                              len(_ERROR_BODY))
    outcome.status = "500"
    outcome.head_sent = True
    try:
        send(head + conn.body(_ERROR_BODY) + conn.end_of_response())
        outcome.sent = len(_ERROR_BODY)
    except OSError:
        pass
