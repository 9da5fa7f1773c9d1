"""Sans-I/O HTTP/1.1 server connection state, on top of ``httptools``.

A :class:`Connection` is fed the bytes a client sent (``receive_data``) and hands
out request events (``next_event``); it builds response heads and frames response
bodies, and never touches a socket. Two promises:

* After any framing error the connection is dead: the error is raised once the
  events before it are consumed, and nothing after it is ever parsed or delivered.
  Pipelined requests are delivered one at a time: the next request is only
  handed out after :meth:`Connection.start_next_cycle`.
* The bytes of a request whose head has not been completely received are never
  lost: :meth:`Connection.unparsed_bytes` returns them verbatim, so an idle
  connection can be handed to another process that parses them from scratch. A
  body's bytes are never kept (a connection is handed back only between requests):
  what a connection holds is bounded by the head limits, whatever its bodies' sizes.

httptools (llhttp) is strict about most of RFC 9112; the checks it does not make
(HTTP/1.0 + Transfer-Encoding, unknown codings, versions other than 1.0/1.1,
target forms and their userinfo, Host and its value, runs of spaces in the request
line and stray CR or LF before it, trailing whitespace, forbidden trailers, limits)
are made here. Nothing switches protocols: a request asking to upgrade is an
ordinary one (its body included), after which the connection closes.
"""

from __future__ import annotations

import time
from collections import deque
from email.utils import formatdate
from urllib.parse import urlsplit

import httptools

from supervisor.config.hostnames import normalise_ipv6, normalise_name

__all__ = [
    "Connection", "Request", "Data", "EndOfMessage", "NEED_DATA", "PAUSED", "CONNECTION_CLOSED",
    "RenderedHead", "render_head", "RemoteProtocolError", "LocalProtocolError", "DateCache",
]


class ProtocolError(Exception):
    """Base of both error kinds; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol (answer ``status`` with Connection: close)."""


class LocalProtocolError(ProtocolError):
    """We (or the application) tried to break the protocol."""


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")            # feed more bytes
PAUSED = _Sentinel("PAUSED")                  # finish the current response first
CONNECTION_CLOSED = _Sentinel("CONNECTION_CLOSED")  # no more requests on this connection


class Request:
    """A request head, made by :class:`Connection` (see on_headers_complete).

    ``method``, ``target``, ``path``, ``query``: bytes; ``version``: "1.0" or "1.1";
    ``headers``: (name, value) bytes pairs in arrival order; ``keep_alive``,
    ``expects_continue``, ``chunked``, ``upgrade``: bools; ``content_length``: int or
    None. ``ends_message``: the request has no body, so no Data and no EndOfMessage
    follow: this event is the whole request."""

    __slots__ = ("method", "target", "path", "query", "version", "headers",
                 "keep_alive", "expects_continue", "chunked", "content_length",
                 "upgrade", "ends_message")

    def __repr__(self) -> str:
        return f"<Request {self.method!r} {self.target!r} HTTP/{self.version}>"


class Data:
    __slots__ = ("data",)
    ends_message = False

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"<Data {len(self.data)} bytes>"


class EndOfMessage:
    """The end of a request; ``trailers``: the (name, value) fields that followed a
    chunked body."""

    __slots__ = ("trailers",)
    ends_message = True

    def __init__(self, trailers: list | tuple) -> None:
        self.trailers = trailers

    def __repr__(self) -> str:
        return f"<EndOfMessage trailers={self.trailers!r}>"


_new_request = object.__new__   # see Connection.on_headers_complete
_END_NO_TRAILERS = EndOfMessage(())   # immutable, so one serves every such request


class _StopParsing(Exception):
    pass


class DateCache:
    """The Date header value, formatted at most once per second."""

    __slots__ = ("_second", "_value", "_line")

    def __init__(self) -> None:
        self._second = -1
        self._value = ""
        self._line = b""

    def _refresh(self, now: float) -> None:
        self._value = formatdate(now, usegmt=True)
        self._line = b"Date: %b\r\n" % self._value.encode("latin-1")
        self._second = int(now)

    def get(self) -> str:
        now = time.time()
        if int(now) != self._second:
            self._refresh(now)
        return self._value

    def line(self) -> bytes:
        """The whole header line, ``b"Date: ...\\r\\n"``."""
        now = time.time()
        if int(now) != self._second:
            self._refresh(now)
        return self._line


# Codings a client may legitimately list before "chunked" (RFC 9110 §18.6 registry).
_KNOWN_CODINGS = frozenset((b"chunked", b"gzip", b"x-gzip", b"deflate", b"compress",
                            b"x-compress", b"identity"))
# Fields that would change framing or routing if a trailer could set them.
_FORBIDDEN_TRAILERS = frozenset((b"content-length", b"transfer-encoding", b"host",
                                 b"connection", b"keep-alive", b"upgrade", b"te",
                                 b"trailer", b"expect", b"content-range"))
_SPECIAL = frozenset((b"host", b"content-length", b"transfer-encoding", b"connection",
                      b"expect", b"content-type"))
_NO_BODY_STATUS = frozenset((204, 304))
# Default Connection.discard_limit: unread body a keep-alive response may leave behind.
DISCARD_LIMIT = 65536
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_HOP_BY_HOP = frozenset(("connection", "keep-alive", "transfer-encoding", "te",
                         "trailer", "upgrade", "proxy-connection"))
_OWS = (b" ", b"\t")
# Byte values for membership tests: `95 in data` is a memchr, while `b"_" in data`
# first tries the needle as an int and raises (and clears) a TypeError every time.
_UNDERSCORE, _HASH, _QUESTION = ord("_"), ord("#"), ord("?")


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip(b" \t").lower() for t in value.split(b",")]


# What a response head takes from the application: (status line and Server field,
# the application's fields, status code, its Content-Length or None, whether it asked
# for Connection: close). See render_head.
RenderedHead = tuple[bytes, bytes, int, "int | None", bool]


def render_head(status: str, headers) -> RenderedHead:
    """Render an application's status and header pairs (validated latin-1 ``str``)
    for :meth:`Connection.whole_response` and :meth:`Connection.rendered_head`.

    Raises :class:`LocalProtocolError` for framing the application may not set
    (hop-by-hop fields, an invalid Content-Length). Pure: callers may memoise it."""
    code = int(status[:3])
    parts = []
    length = None
    close = False
    for name, value in headers:
        lname = name.lower()
        if lname in _HOP_BY_HOP:
            if lname == "connection":
                if "close" in value.lower():
                    close = True
                continue
            raise LocalProtocolError(500, f"hop-by-hop header {name!r} from application")
        if lname == "content-length":
            if length is not None or not value.isdigit():
                raise LocalProtocolError(500, "invalid Content-Length from application")
            length = int(value)
        parts += (name, ": ", value, "\r\n")
    start = f"HTTP/1.1 {status}\r\nServer: baton\r\n".encode("latin-1")
    return start, "".join(parts).encode("latin-1"), code, length, close


def _host_ok(value: bytes) -> bool:
    """Is ``value`` a Host field value (or an authority) Baton serves: empty (RFC 9112
    §3.2, for a target without one), or a host name or IPv4 address as
    :mod:`supervisor.config.hostnames` reads them, or an IPv6 literal in brackets, with
    an optional ":port". No userinfo, path, space or percent-encoding. Memoised."""
    text = value.decode("latin-1")
    ok = True
    if text:
        if text[0] == "[":
            literal, bracket, port = text[1:].partition("]")
            ok = bool(bracket) and normalise_ipv6(literal) is not None
            if port:
                ok = ok and port[0] == ":"
                port = port[1:]
                ok = ok and port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535
        else:
            name, colon, port = text.partition(":")
            ok = normalise_name(name) is not None and (
                not colon or (port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535))
    if len(_HOSTS_OK) < _HOSTS_OK_MAX:
        _HOSTS_OK[value] = ok
    return ok


# Memo of _host_ok, a pure function: clients send few distinct Host values. A plain
# dict (bounded by refusing new values when full: a miss costs what checking costs).
_HOSTS_OK: dict[bytes, bool] = {}
_HOSTS_OK_MAX = 512


def _head_end(data: bytes, start: int) -> int:
    """Where the head of the message whose bytes begin at ``start`` of ``data`` ends
    (llhttp found it complete, with CRLF line ends)."""
    while data.startswith(b"\r\n", start):   # empty lines before a request line
        start += 2
    return data.find(b"\r\n\r\n", start) + 4


class _BodyEnd:
    """Where a request body ends, followed through its bytes as they arrive, without
    keeping them. llhttp validates the framing; this only measures it, the same way.

    ``advance(data, at)`` returns the offset in ``data`` just past the body (and, for a
    chunked one, its trailer section), or -1 when the body goes on after ``data``.
    Raises ValueError for a chunk-size line it cannot read or longer than
    ``line_cap``. What it keeps between calls is bounded: a count, or an unfinished
    chunk-size line, or the last 3 bytes of a trailer section."""

    __slots__ = ("remaining", "chunked", "trailers", "line", "line_cap", "section_started")

    def __init__(self, remaining: int, chunked: bool, line_cap: int) -> None:
        self.remaining = remaining      # Content-Length left, or a chunk's data and CRLF
        self.chunked = chunked
        self.trailers = False           # past the last chunk: until an empty line
        self.section_started = False    # more of the trailer section came than `line` holds
        self.line = b""                 # an unfinished line, carried to the next bytes
        self.line_cap = line_cap

    def advance(self, data: bytes, at: int = 0) -> int:
        shift = 0
        if self.line:
            shift = at - len(self.line)
            data = self.line + data[at:]
            at = 0
            self.line = b""
        end = len(data)
        pos = at
        while True:
            remaining = self.remaining
            if remaining:
                if end - pos < remaining:
                    self.remaining = remaining - (end - pos)
                    return -1
                pos += remaining
                self.remaining = 0
                if not self.chunked:
                    return pos + shift
            if self.trailers:
                # The section ends at an empty line: at its very start, or after a field.
                if not self.section_started and data.startswith(b"\r\n", pos):
                    return pos + 2 + shift
                stop = data.find(b"\r\n\r\n", pos)
                if stop >= 0:
                    return stop + 4 + shift
                if end - pos > 3:
                    self.section_started = True
                    pos = end - 3       # enough to find a CRLFCRLF that spans two reads
                self.line = data[pos:]
                return -1
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                if end - pos > self.line_cap:
                    raise ValueError("chunk-size line too long")
                self.line = data[pos:]
                return -1
            size = data[pos:eol].partition(b";")[0]
            if not size or size.strip(b"0123456789abcdefABCDEF"):
                raise ValueError("invalid chunk size")
            pos = eol + 2
            if size.strip(b"0"):
                self.remaining = int(size, 16) + 2
            else:
                self.trailers = True


class _BodyOnly:
    """The parser callbacks for the body of an upgrade request (see
    Connection._upgraded): the parser is fed a made-up head first, which is ignored."""

    __slots__ = ("conn", "in_body")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.in_body = False

    def on_message_begin(self) -> None:
        if self.in_body:
            self.conn.on_message_begin()   # the next request: refused (closing)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_body:
            self.conn.on_header(name, value)   # a trailer

    def on_headers_complete(self) -> None:
        self.in_body = True

    def on_body(self, body: bytes) -> None:
        self.conn.on_body(body)

    def on_message_complete(self) -> None:
        self.conn._skipped_body = False
        self.conn.on_message_complete()


class Connection:
    """Server side of one HTTP/1.1 connection.

    ``next_event()`` returns, for each request: a :class:`Request`, then, if it has a
    body, zero or more :class:`Data` and an :class:`EndOfMessage` (an event's
    ``ends_message`` says it was the request's last); then ``PAUSED`` until
    ``start_next_cycle()`` is called after the response was sent. ``NEED_DATA``
    means more bytes are needed, ``CONNECTION_CLOSED`` that no request will follow.
    Raises :class:`RemoteProtocolError` for a bad request, after which the
    connection is dead.

    A response may be framed before its request's body is all here (``body_pending``:
    the app answers early, or echoes as it reads). It keeps the connection only if
    what is still to come can be dropped within ``discard_limit`` bytes (a known
    Content-Length, after any 100 Continue the client awaits); else it says
    ``Connection: close``. Either way the rest of the body is still delivered.
    """

    __slots__ = ("limit_request_line", "limit_request_fields", "limit_request_field_size",
                 "max_body_size", "require_host", "_field_cap", "_head_cap", "_date",
                 "_parser", "_events", "_raw", "_raw_len", "_error", "_dead", "_eof",
                 "_paused", "_closing", "_in_message", "_ended", "_url", "_headers",
                 "_request", "_trailers", "_body_len", "_body_end", "_skipped_body", "_mark",
                 "discard_limit", "_continued",
                 "response_keep_alive", "_resp_chunked",
                 "_resp_no_body", "_resp_remaining", "_resp_started")

    def __init__(self, *, limit_request_line: int = 8190, limit_request_fields: int = 100,
                 limit_request_field_size: int = 8190, max_body_size: int | None = None,
                 require_host: bool = True, date_cache: DateCache | None = None,
                 discard_limit: int = DISCARD_LIMIT) -> None:
        self.limit_request_line = limit_request_line
        self.limit_request_fields = limit_request_fields
        self.limit_request_field_size = limit_request_field_size
        self.max_body_size = max_body_size   # None: no limit
        self.require_host = require_host
        # Body bytes still to come that a keep-alive response may leave to be read and
        # dropped after it (see _frame); past that the response closes the connection.
        self.discard_limit = discard_limit
        self._continued = False          # 100 Continue was sent for the current request
        self._field_cap = limit_request_field_size - 4   # name and value; ": " and CRLF
        # A head may be at most this long before it is complete (memory guard for
        # clients that trickle an endless header block).
        self._head_cap = (limit_request_line + 2
                          + limit_request_fields * (limit_request_field_size + 2) + 2)
        self._date = date_cache if date_cache is not None else DateCache()
        self._parser = httptools.HttpRequestParser(self)
        self._events: deque = deque()
        # The fed bytes of the message in progress while its head is incomplete (a
        # hand-back's unparsed bytes); a body's bytes are never kept (see _enter_body).
        self._raw: list[bytes] = []
        self._raw_len = 0
        self._error: RemoteProtocolError | None = None   # raised after queued events
        self._dead = False               # parser must never see another byte
        self._eof = False
        self._paused = False             # request delivered, response not done
        self._closing = False            # no request after the current one
        self._in_message = False
        self._ended: list[Request] = []  # requests completed during the current feed
        self._url = b""
        self._headers: list = []         # (name, value) as llhttp gave them
        self._request: Request | None = None
        self._trailers: list | None = None
        self._body_len = 0
        self._body_end: _BodyEnd | None = None   # a keep-alive request's body is arriving
        self._skipped_body = False       # llhttp will skip this body (an upgrade): see _upgraded
        self._mark = (0, 0)              # (offset, count): where this feed's ended requests end
        # Response state.
        self.response_keep_alive = False
        self._resp_chunked = False
        self._resp_no_body = False
        self._resp_remaining: int | None = None
        self._resp_started = False

    # ---------------------------------------------------------------- receiving

    def close(self) -> None:
        """Forget the parser (it refers back to this object): nothing more is parsed.

        Not required, but frees a closed connection without waiting for the cycle
        collector."""
        self._dead = True
        self._parser = None
        self._forget_raw()
        self._body_end = None
        self._events.clear()

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the peer; ``b""`` means the peer closed its side.

        They are parsed at once; the events wait in a queue that :meth:`next_event`
        hands out one request at a time."""
        if not data:
            self._eof = True
            return
        if self._dead:
            return
        body_end = self._body_end
        if body_end is not None:
            # The body of a keep-alive request goes to the parser and is not kept: a
            # connection is handed back only between requests. Only where it ends is
            # followed, so that the next request's bytes begin a feed of their own.
            try:
                end = body_end.advance(data)
            except ValueError as exc:
                self._refuse(400, str(exc))
                return
            if end < 0:
                if self._parse(data) and self._request is None:
                    self._refuse(400, "chunked body framing llhttp and Baton measure differently")
                return
            self._body_end = None
            if not self._parse(data[:end]):
                return
            self._ended.clear()
            if self._request is not None:
                self._refuse(400, "chunked body framing llhttp and Baton measure differently")
                return
            data = data[end:]
            if not data or self._dead or self._closing:
                return
        self._raw.append(data)
        self._raw_len += len(data)
        if self._parse(data):
            self._after_feed()

    def _parse(self, data: bytes) -> bool:
        """Feed the parser; False when it stopped (an error, a close, an upgrade)."""
        try:
            self._parser.feed_data(data)
            return True
        except httptools.HttpParserUpgrade as exc:
            self._upgraded(data, exc.args[0])
        except httptools.HttpParserError as exc:
            self._ended.clear()
            self._dead = True
            self._forget_raw()
            if self._error is None and not self._closing:
                status = 400
                reason = str(exc) or type(exc).__name__
                self._error = RemoteProtocolError(status, reason)
        return False

    def _after_feed(self) -> None:
        """A feed parsed without error: keep only the bytes an idle hand-back needs."""
        if self._ended:
            if self._in_message:
                self._account_ended()
            else:
                # The usual case: this feed ended with the request it completed
                # (empty lines may follow, which RFC 9112 §2.2 lets a server ignore).
                self._forget_raw()
                return
        if not self._in_message:
            return
        if self._request is not None:
            self._enter_body()
        elif self._raw_len > self._head_cap:
            # Still in a head: guard the memory an unfinished head can take.
            self._dead = True
            self._error = RemoteProtocolError(431, "request header block too large")

    def _enter_body(self) -> None:
        """The message in progress is in its body: drop its bytes, and for a keep-alive
        request start following where the body ends (see receive_data)."""
        request = self._request
        if request.keep_alive:
            if request.chunked:
                data, start = self._message_start()
                body_end = _BodyEnd(0, True, self.limit_request_field_size)
                try:
                    ended = body_end.advance(data, _head_end(data, start))
                except ValueError as exc:
                    self._refuse(400, str(exc))
                    return
                if ended >= 0:
                    self._refuse(400, "chunked body framing llhttp and Baton measure differently")
                    return
            else:
                body_end = _BodyEnd(request.content_length - self._body_len, False, 0)
            self._body_end = body_end
        self._forget_raw()

    def _upgraded(self, data: bytes, offset: int) -> None:
        """llhttp stopped at ``offset`` of ``data``: a CONNECT, or a request asking to
        switch protocols (Connection: upgrade). Baton switches nothing: CONNECT is
        answered and the connection closes (what follows would be a tunnel); any other
        request is an ordinary one, whose body llhttp skipped: it is parsed here."""
        self._ended.clear()
        self._forget_raw()
        request = self._request
        if request is None or request.method == b"CONNECT" or request.ends_message:
            self._dead = True
            self._closing = True
            return
        # A parser that only ever sees this body: a head stating the same framing,
        # then the bytes after the real head. Upgrade requests never keep the
        # connection (see on_headers_complete), so it parses nothing after the body.
        parser = httptools.HttpRequestParser(_BodyOnly(self))
        if request.chunked:
            parser.feed_data(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        else:
            parser.feed_data(b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % request.content_length)
        self._parser = parser
        rest = data[offset:]
        if rest:
            self._raw.append(rest)
            self._raw_len = len(rest)
            if self._parse(rest):
                self._after_feed()

    def _refuse(self, status: int, reason: str) -> None:
        """A framing error found outside a parser callback: the connection is dead."""
        self._dead = True
        self._forget_raw()
        self._ended.clear()
        if self._error is None:
            self._error = RemoteProtocolError(status, reason)

    def _forget_raw(self) -> None:
        self._raw.clear()
        self._raw_len = 0
        self._ended.clear()
        self._mark = (0, 0)

    @property
    def idle(self) -> bool:
        """True between requests: nothing delivered and unanswered, nothing queued."""
        return not (self._paused or self._events or self._request is not None
                    or self._dead or self._closing)

    @property
    def has_unparsed(self) -> bool:
        """Something of a next request is here: bytes not yet delivered, queued
        events, or an error still to be raised by :meth:`next_event`."""
        return bool(self._raw_len or self._events or self._error is not None)

    @property
    def buffered(self) -> int:
        """How many received bytes this connection keeps: those of an unfinished head
        (bounded by the limits), and none of a body, however long."""
        body_end = self._body_end
        return self._raw_len + (len(body_end.line) if body_end is not None else 0)

    def unparsed_bytes(self) -> bytes:
        """Bytes received that belong to no request delivered so far.

        Only meaningful while ``idle``: they can be fed to a fresh Connection.
        """
        return b"".join(self._raw)

    def next_event(self):
        if self._paused:
            return PAUSED
        events = self._events
        if not events:
            if self._error is not None:
                err, self._error = self._error, None
                raise err
            if self._dead or (self._closing and self._request is None):
                # (A response that closes may go out before its request's body is
                # in: that body is still delivered.)
                return CONNECTION_CLOSED
            if self._eof:
                self._dead = True
                if self._in_message or self._raw_len:
                    raise RemoteProtocolError(400, "incomplete request")
                return CONNECTION_CLOSED
            return NEED_DATA
        event = events.popleft()
        if event.ends_message:
            self._paused = True
        return event

    def _message_start(self) -> tuple[bytes, int]:
        """The bytes of this feed (and of the unfinished head before it) and where in
        them the message in progress begins: after the requests this feed completed."""
        raw = self._raw
        data = raw[0] if len(raw) == 1 else b"".join(raw)
        ended = self._ended
        start, counted = self._mark
        if counted < len(ended):
            for request in ended[counted:]:
                start = (_head_end(data, start) if request.ends_message
                         else self._message_end(data, request, start))
            self._mark = (start, len(ended))
        return data, start

    def _account_ended(self) -> None:
        """A pipelined request began after those this feed completed: drop their
        bytes from ``_raw``, so that only its own remain (``unparsed_bytes``)."""
        data, start = self._message_start()
        rest = data[start:]
        raw = self._raw
        raw.clear()
        raw.append(rest)
        self._raw_len = len(rest)
        self._ended.clear()
        self._mark = (0, 0)

    def _fail(self, status: int, reason: str):
        """Record the error and abort parsing (called from parser callbacks)."""
        err = RemoteProtocolError(status, reason)
        if self._error is None:
            self._error = err
        raise err

    # httptools callbacks ------------------------------------------------------
    #
    # llhttp itself rejects control characters (other than HTAB) in field values,
    # bare CR or LF, obs-fold and whitespace before the colon, in heads and trailers.

    def on_message_begin(self) -> None:
        if self._closing:
            # The previous request said Connection: close; whatever follows is
            # never parsed (abort llhttp; the error is swallowed in _feed).
            raise _StopParsing
        self._in_message = True

    def on_url(self, url: bytes) -> None:
        url = self._url + url if self._url else url
        self._url = url
        if len(url) + 13 > self.limit_request_line:
            self._fail(414, "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        # Called once per field: only collect here (the count is checked at once, so
        # that a flood of tiny fields cannot grow the list); on_headers_complete
        # checks and interprets them all in one pass.
        headers = self._headers
        if len(headers) >= self.limit_request_fields or self._request is not None:
            self._header_slow(name, value)
        else:
            headers.append((name, value))

    def _header_slow(self, name: bytes, value: bytes) -> None:
        if self._request is None:
            self._fail(431, "too many header fields")
        # A trailer field (chunked request body): it counts against the same limit.
        if len(self._headers) + len(self._trailers) >= self.limit_request_fields:
            self._fail(431, "too many header fields")
        if len(name) + len(value) + 4 > self.limit_request_field_size:
            self._fail(431, "header field too large")
        if value[-1:] in _OWS:
            value = value.rstrip(b" \t")
        if name.lower() in _FORBIDDEN_TRAILERS:
            self._fail(400, "forbidden trailer field")
        # A name with "_" is dropped (as in a head) but still counted.
        self._trailers.append((name, value) if _UNDERSCORE not in name else None)

    def on_headers_complete(self) -> None:
        # The fields, checked and interpreted in one pass.
        fields = self._headers
        field_cap = self._field_cap
        hosts = 0
        cl = te = expect = host = None
        tokens = ()
        ctype_seen = False
        rebuild = False
        for name, value in fields:
            if len(name) + len(value) > field_cap:
                self._fail(431, "header field too large")
            if value[-1:] in _OWS:
                # llhttp keeps trailing whitespace; RFC 9110 §5.5: not part of the value.
                value = value.rstrip(b" \t")
                rebuild = True
            if _UNDERSCORE in name:
                # Dropped, never forwarded: with CGI-style mapping X_Y and X-Y collide,
                # which lets a client spoof headers a proxy set.
                rebuild = True
                continue
            lname = name.lower()
            if lname in _SPECIAL:
                if lname == b"host":
                    hosts += 1
                    host = value
                elif lname == b"content-length":
                    if cl is not None and cl != value:
                        self._fail(400, "conflicting Content-Length")
                    if not value.isdigit():
                        self._fail(400, "invalid Content-Length")
                    cl = value
                elif lname == b"transfer-encoding":
                    te = value if te is None else te + b"," + value
                elif lname == b"connection":
                    tokens = tokens + tuple(_tokens(value))
                elif lname == b"expect":
                    expect = value
                elif ctype_seen:   # content-type
                    self._fail(400, "duplicate Content-Type")
                else:
                    ctype_seen = True
        headers = fields
        if rebuild:
            headers = [(n, v.rstrip(b" \t") if v[-1:] in _OWS else v)
                       for n, v in fields if _UNDERSCORE not in n]
        parser = self._parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            self._fail(400, "unsupported HTTP version")
        method = parser.get_method()
        target = self._url
        if len(method) + len(target) + 10 > self.limit_request_line:
            self._fail(414, "request line too long")
        self._check_request_line(method, target)
        if target[:1] == b"/":
            if _QUESTION in target:
                path, _, query = target.partition(b"?")
                if _HASH in query:
                    query = query.partition(b"#")[0]
            else:
                path, query = target, b""
            if _HASH in path:
                path = path.partition(b"#")[0]
        else:
            path, query = self._other_target(method, target)
        if hosts != 1:
            if hosts > 1 or (version == "1.1" and self.require_host):
                self._fail(400, "a request needs exactly one Host header")
        elif not (_HOSTS_OK.get(host) or _host_ok(host)):
            self._fail(400, "invalid Host header")
        chunked = False
        content_length = None
        if te is not None:
            if version == "1.0":
                self._fail(400, "Transfer-Encoding in an HTTP/1.0 request")
            if cl is not None:
                self._fail(400, "both Content-Length and Transfer-Encoding")
            codings = _tokens(te)
            if codings[-1] != b"chunked" or codings.count(b"chunked") != 1:
                self._fail(400, "Transfer-Encoding must end with chunked")
            for coding in codings:
                if coding not in _KNOWN_CODINGS:
                    self._fail(400, "unknown transfer coding")
            chunked = True
            self._trailers = []
        elif cl is not None:
            content_length = int(cl)
            if self.max_body_size is not None and content_length > self.max_body_size:
                self._fail(413, "request body too large")
        if version == "1.1":
            keep_alive = b"close" not in tokens
        else:
            keep_alive = b"keep-alive" in tokens and b"close" not in tokens
        # llhttp only upgrades a CONNECT or a request with Connection: upgrade.
        upgrade = (tokens or method == b"CONNECT") and parser.should_upgrade()
        if upgrade:
            # Nothing is switched: the request is served as an ordinary one, without
            # its Upgrade field, and the connection closes after the response.
            keep_alive = False
            if method != b"CONNECT":
                headers = [(n, v) for n, v in headers if n.lower() != b"upgrade"]
                self._skipped_body = chunked or bool(content_length)
        self._continued = False
        expects_continue = (expect is not None and version == "1.1"
                            and expect.lower() == b"100-continue"
                            and (chunked or bool(content_length)))
        # Built through its slots: a call to __init__ with eleven arguments costs about
        # as much as everything above, once per request.
        request = _new_request(Request)
        request.method = method
        request.target = target
        request.path = path
        request.query = query
        request.version = version
        request.headers = headers
        request.keep_alive = keep_alive
        request.expects_continue = expects_continue
        request.chunked = chunked
        request.content_length = content_length
        request.upgrade = upgrade
        request.ends_message = not (chunked or content_length)
        self._request = request
        self._events.append(request)

    def _other_target(self, method: bytes, target: bytes) -> tuple[bytes, bytes]:
        """Validate asterisk-, authority- and absolute-form targets (RFC 9112 §3.2)."""
        if target == b"*":
            if method != b"OPTIONS":
                self._fail(400, "asterisk-form target is only for OPTIONS")
            return b"*", b""
        if method == b"CONNECT":
            port = target.rpartition(b":")[2]
            if not port.isdigit() or not _host_ok(target):   # a host and a port, nothing else
                self._fail(400, "invalid authority-form target")
            return b"", b""
        try:
            parts = urlsplit(target.decode("latin-1"))
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            self._fail(400, "invalid request target")
        if not parts.scheme or not parts.netloc or not target.lower().startswith(
                (parts.scheme.encode("latin-1") + b"://")):
            self._fail(400, "invalid request target")
        if parts.scheme.lower() not in ("http", "https"):
            self._fail(400, "unsupported target scheme")
        if "@" in parts.netloc:
            # RFC 9110 §4.2.4: userinfo is deprecated, and a sender must not send it.
            self._fail(400, "userinfo in the request target")
        if not _host_ok(parts.netloc.encode("latin-1")):
            self._fail(400, "invalid authority in the request target")
        return (parts.path or "/").encode("latin-1"), parts.query.encode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body_len += len(body)
        if self.max_body_size is not None and self._body_len > self.max_body_size:
            self._fail(413, "request body too large")
        self._events.append(Data(body))

    def on_message_complete(self) -> None:
        if self._skipped_body:
            return   # llhttp skipped an upgrade request's body: _upgraded parses it
        request = self._request
        trailers = self._trailers
        if trailers and None in trailers:
            trailers = [t for t in trailers if t is not None]
        if not request.ends_message:
            self._events.append(EndOfMessage(trailers) if trailers else _END_NO_TRAILERS)
        if not request.keep_alive:
            self._closing = True
        self._ended.append(request)   # its bytes leave _raw when the feed returns
        self._in_message = False
        self._url = b""
        self._headers = []
        self._request = None
        self._trailers = None
        self._body_len = 0

    def _check_request_line(self, method: bytes, target: bytes) -> None:
        """llhttp lets runs of spaces separate the request line's parts and skips any
        CR or LF before it; RFC 9112 §3 wants one space, and §2.2 only empty lines."""
        raw = self._raw
        ended = self._ended
        if not ended and len(raw) == 1:   # the usual case: the head began this feed's bytes
            data = raw[0]
            at = 0
        else:   # _message_start, inlined for pipelined requests
            data = raw[0] if len(raw) == 1 else b"".join(raw)
            at, counted = self._mark
            if counted < len(ended):
                for request in ended[counted:]:
                    at = (_head_end(data, at) if request.ends_message
                          else self._message_end(data, request, at))
                self._mark = (at, len(ended))
        if data[at] == 13:   # CR: empty lines before the request line are fine, and no more
            while data.startswith(b"\r\n", at):
                at += 2
        m = len(method)
        after_target = at + m + 1 + len(target)
        if not (data.startswith(method, at) and data[at + m] == 32 and data.startswith(target, at + m + 1)
                and data[after_target] == 32 and data[after_target + 1] == 72):   # " H"TTP/
            self._fail(400, "malformed request line")

    @staticmethod
    def _message_end(data: bytes, request: Request, start: int) -> int:
        """Where ``request``, whose bytes begin at ``start`` of ``data``, ends."""
        pos = _head_end(data, start)
        if request.content_length:
            return pos + request.content_length
        if not request.chunked:
            return pos
        return _BodyEnd(0, True, len(data)).advance(data, pos)   # llhttp validated it

    @property
    def body_pending(self) -> bool:
        """The current request's body has not all been received (nor the framing
        error that stopped it passed over): the client may still be sending it."""
        return self._request is not None

    def interim_continue(self) -> bytes:
        """The interim ``100 Continue`` response, for a request that ``expects_continue``
        whose body is about to be read. Once it is sent the client sends its body, so a
        keep-alive response may leave that body to be dropped (see :meth:`_frame`)."""
        self._continued = True
        return _CONTINUE

    def start_next_cycle(self) -> bool:
        """The response to the current request is complete: allow the next one.

        Returns :attr:`has_unparsed`: whether something of it is already here."""
        self._paused = False
        self._resp_started = False
        return bool(self._raw_len or self._events or self._error is not None)

    # ---------------------------------------------------------------- responding

    def response_head(self, request: Request, status: str, headers,
                      content_length_hint: int | None = None) -> bytes:
        """Build the response head; ``status`` is "NNN Reason", headers are
        validated latin-1 ``str`` pairs (WSGI native strings), in a list or tuple.

        ``content_length_hint``: the whole body length, when the caller knows it
        although the application gave no Content-Length.
        """
        return self.rendered_head(request, render_head(status, headers), content_length_hint)

    def rendered_head(self, request: Request, rendered: RenderedHead,
                      content_length_hint: int | None = None) -> bytes:
        """:meth:`response_head` for a head already rendered by :func:`render_head`."""
        start, fields, code, length, app_close = rendered
        end = self._frame(request, code, length, content_length_hint, app_close)
        return b"".join((start, self._date.line(), fields, end))

    def whole_response(self, request: Request, rendered: RenderedHead, body: bytes) -> bytes:
        """Head (rendered by :func:`render_head`), ``body`` and end of a response whose
        body is known whole, in one piece (the Content-Length is the body's unless the
        application gave one)."""
        start, fields, code, length, app_close = rendered
        size = len(body)
        end = self._frame(request, code, length, size, app_close)
        if self._resp_no_body:
            return b"".join((start, self._date.line(), fields, end))
        remaining = self._resp_remaining   # not None: a length is known
        if size != remaining:
            if size > remaining:
                # Nothing went out: the caller may still answer with an error.
                self._resp_started = False
                raise LocalProtocolError(500, "application wrote more than Content-Length")
            # The app promised more than it gave: the client would wait forever.
            self.response_keep_alive = False
            self._closing = True
        self._resp_remaining = remaining - size
        return b"".join((start, self._date.line(), fields, end, body))

    def _frame(self, request: Request, code: int, length: int | None,
               content_length_hint: int | None, app_close: bool) -> bytes:
        """Decide how the response body is framed and whether the connection stays
        open; return the bytes that end the head (framing fields and blank line)."""
        if self._resp_started:
            raise LocalProtocolError(500, "response already started")
        keep_alive = request.keep_alive and not app_close
        if keep_alive and self._request is request and not self._body_droppable(request):
            keep_alive = False
        framing = b""
        chunked = False
        if code < 200 or code in _NO_BODY_STATUS:
            no_body = True
            length = 0
        elif request.method == b"HEAD":
            no_body = True
        else:
            no_body = False
            if length is None:
                if content_length_hint is not None:
                    length = content_length_hint
                    framing = b"Content-Length: %d\r\n" % length
                elif request.version == "1.1":
                    chunked = True
                    framing = b"Transfer-Encoding: chunked\r\n"
                else:
                    keep_alive = False   # the body ends when we close
        if not keep_alive:
            end = b"Connection: close\r\n\r\n"
            self._closing = True
        elif request.version == "1.0":
            end = b"Connection: keep-alive\r\n\r\n"
        else:
            end = b"\r\n"
        self.response_keep_alive = keep_alive
        self._resp_chunked = chunked
        self._resp_no_body = no_body
        self._resp_remaining = None if no_body else length
        self._resp_started = True
        return framing + end if framing else end

    def _body_droppable(self, request: Request) -> bool:
        """Can what has not arrived of ``request``'s body be read and dropped after its
        response, within ``discard_limit`` bytes? Not for a chunked body (its size is
        unknown), nor for one whose client awaits a 100 Continue never sent (it may
        send its body or not: only closing ends that doubt)."""
        if request.chunked or (request.expects_continue and not self._continued):
            return False
        return request.content_length - self._body_len <= self.discard_limit

    def body(self, data: bytes) -> bytes:
        """Frame one piece of response body (may return b"")."""
        if self._resp_no_body or not data:
            return b""
        if self._resp_chunked:
            return b"%x\r\n%b\r\n" % (len(data), data)
        remaining = self._resp_remaining
        if remaining is not None:
            if len(data) > remaining:
                self.response_keep_alive = False
                self._closing = True
                raise LocalProtocolError(500, "application wrote more than Content-Length")
            self._resp_remaining = remaining - len(data)
        return data

    def count_body(self, nbytes: int) -> None:
        """Account for body bytes sent outside :meth:`body` (sendfile)."""
        if self._resp_remaining is not None:
            if nbytes > self._resp_remaining:
                raise LocalProtocolError(500, "file longer than Content-Length")
            self._resp_remaining -= nbytes

    def end_of_response(self) -> bytes:
        """Bytes that end the body; afterwards ``response_keep_alive`` is final."""
        if self._resp_chunked:
            return b"0\r\n\r\n"
        if self._resp_remaining:
            # The app promised more than it sent: the client would wait forever.
            self.response_keep_alive = False
            self._closing = True
        return b""

    @property
    def response_remaining(self) -> int | None:
        """Body bytes still owed under the response's Content-Length (None: unbounded)."""
        return self._resp_remaining

    @property
    def response_chunked(self) -> bool:
        return self._resp_chunked

    @property
    def response_started(self) -> bool:
        """Whether the current response's head was framed (and so handed to be sent);
        interim 100 Continue lines do not count. Another thread may read it (the
        worker's timeout answer), knowing it may turn True just after."""
        return self._resp_started
