"""gunicorn's request corpus (plus our own cases in tests/requests) through http11.

Every valid case must parse to the same requests whole, byte by byte and in seeded
random splits, and leave a trailing partial request unparsed; every invalid case
must be rejected. Cases with gunicorn's ``proxy_protocol`` option go through
supervisor.http.proxyproto first, as a PROXY listener's connections do, and the rest of the
stream to http11. The expectation files are evaluated with imports stripped and
stub names only: gunicorn is never imported.
"""

from __future__ import annotations

import ast
import os
import random
from pathlib import Path

import pytest

from supervisor.http import protocol as http11
from supervisor.http import proxyproto

HERE = Path(__file__).resolve().parent
CORPUS = Path(os.environ.get("BATON_CORPUS")
              or HERE.parents[2] / "shared" / "corpus" / "gunicorn-requests")
OURS = HERE / "requests"

# Cases whose expectation relies on gunicorn options Baton does not have, or where
# Baton is deliberately stricter. "reject": we assert the request is refused.
STRICTER = {
    "valid/009": "Content-Length with Transfer-Encoding (even identity) is refused",
    "valid/027": "raw non-ASCII bytes in the target: llhttp refuses them (RFC 9112 targets are ASCII)",
    "valid/031": "llhttp only accepts registered methods",
    "valid/031compat": "permit_unconventional_http_method: llhttp only accepts registered methods",
    "valid/031compat2": "permit_unconventional_http_method: llhttp only accepts registered methods",
    "valid/099": "Content-Length 17914 with 8599 body bytes then EOF: an incomplete request",
    "valid/013": "whitespace inside chunk extensions: llhttp refuses it",
    "valid/028": "strip_header_spaces: whitespace before ':' is always refused",
    "valid/compat_obs_fold": "permit_obsolete_folding: obs-fold is always refused",
    "valid/compat_obs_fold_huge": "permit_obsolete_folding: obs-fold is always refused",
    "valid/pp_03": "a proxy_protocol listener requires the PROXY header (gunicorn's is "
                   "optional): without it any client could choose its REMOTE_ADDR",
    "valid/002": "Host 0.0.0.0=5000: a Host value must be a host name or address and a port",
    "valid/003": "Host 0.0.0.0=5000: a Host value must be a host name or address and a port",
    "valid/rfc9112_target_absolute_userinfo_01": "userinfo in an absolute-form target is refused "
                                                  "(RFC 9110 §4.2.4: senders must not send it)",
}
SKIPPED = {
    "valid/040_compat": "header_map=dangerous: Baton always drops names with '_' (valid/040)",
    "invalid/040": "header_map=refuse: Baton drops names with '_' instead (valid/040)",
    "invalid/chunked_07": "header_map=refuse: Baton drops names with '_' instead",
    "invalid/019": "X-Forwarded-* scheme conflicts are a WSGI-layer matter (test_wsgi)",
}
# gunicorn options that map onto our constructor arguments.
LIMIT_OPTIONS = {"limit_request_line", "limit_request_fields", "limit_request_field_size"}
KNOWN_OPTIONS = LIMIT_OPTIONS | {"proxy_protocol"}
# gunicorn's defaults (its request line limit is 4094, ours 8190).
DEFAULT_LIMITS = {"limit_request_line": 4094, "limit_request_fields": 100,
                  "limit_request_field_size": 8190}


def decode_http(text: str) -> bytes:
    """The corpus escape format (see SOURCE.md)."""
    text = text.replace("\r", "").replace("\n", "")
    out = bytearray()
    i = 0
    escapes = {"r": b"\r", "n": b"\n", "t": b"\t", "0": b"\0"}
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out += ch.encode("latin-1") if ord(ch) < 256 else ch.encode("utf-8")
            i += 1
            continue
        nxt = text[i + 1]
        if nxt in escapes:
            out += escapes[nxt]
            i += 2
        elif nxt == "x":
            out.append(int(text[i + 2:i + 4], 16))
            i += 4
        else:
            raise ValueError(f"unknown escape \\{nxt}")
    return bytes(out)


class _Config:
    def __init__(self) -> None:
        self.settings: dict = {}

    def set(self, name, value) -> None:
        self.settings[name] = value


class _ErrorStub(Exception):
    pass


class _Namespace(dict):
    """Unknown names (gunicorn error classes) resolve to a stub class."""

    def __missing__(self, key):
        if key[:1].isupper():
            return type(key, (_ErrorStub,), {})
        raise KeyError(key)


def load_expectation(path: Path) -> tuple[object, dict]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    tree.body = [node for node in tree.body if not isinstance(node, (ast.Import, ast.ImportFrom))]
    ns = _Namespace(uri=lambda raw: raw, Config=_Config, __builtins__={})
    exec(compile(tree, str(path), "exec"), ns)  # noqa: S102 - data files, stub namespace
    cfg = ns.get("cfg")
    return ns["request"], (cfg.settings if cfg is not None else {})


def collect():
    cases = []
    for root, prefix in ((CORPUS, ""), (OURS, "ours:")):
        for kind in ("valid", "invalid"):
            folder = root / kind
            if not folder.is_dir():
                continue
            for http in sorted(folder.glob("*.http")):
                cases.append(pytest.param(prefix, kind, http, id=f"{prefix}{kind}/{http.stem}"))
    return cases


CASES = collect()


def connection_for(settings: dict, *, require_host: bool) -> http11.Connection:
    limits = dict(DEFAULT_LIMITS)
    for name in LIMIT_OPTIONS & settings.keys():
        # gunicorn treats 0 as "use the default".
        limits[name] = settings[name] or DEFAULT_LIMITS[name]
    return http11.Connection(require_host=require_host, **limits)


class ProxyRejected(Exception):
    """The PROXY header in front of the HTTP stream was refused (the server closes)."""


def run(conn: http11.Connection, chunks, *, eof: bool, proxy: bool = False) -> list[dict]:
    """Feed ``chunks`` (after a PROXY header if ``proxy``); return the requests seen.
    Raises RemoteProtocolError or ProxyRejected."""
    done: list[dict] = []
    current: dict | None = None
    feeds = list(chunks) + ([b""] if eof else [])
    header = bytearray() if proxy else None   # PROXY bytes still undecided
    for chunk in feeds:
        if header is not None:
            header += chunk
            result = proxyproto.parse(bytes(header))
            if result.status == "invalid" or (result.status == "need_more" and not chunk):
                raise ProxyRejected(result.reason or "EOF inside the PROXY header")
            if result.status == "need_more":
                continue
            chunk = bytes(header[result.consumed:])
            header = None
            if not chunk:
                continue                      # b"" would mean EOF to http11
        conn.receive_data(chunk)
        while True:
            event = conn.next_event()
            if isinstance(event, http11.Request):
                current = {
                    "method": event.method.decode("latin-1"),
                    "uri": event.target.decode("latin-1"),
                    "version": tuple(int(p) for p in event.version.split(".")),
                    "headers": [(n.decode("latin-1").upper(), v.decode("latin-1"))
                                for n, v in event.headers],
                    "body": b"",
                }
                if event.ends_message:
                    done.append(current)
                    current = None
            elif isinstance(event, http11.Data):
                current["body"] += event.data
            elif isinstance(event, http11.EndOfMessage):
                if event.trailers:
                    current["trailers"] = [(n.decode("latin-1").upper(), v.decode("latin-1"))
                                           for n, v in event.trailers]
                done.append(current)
                current = None
            elif event is http11.PAUSED:
                conn.start_next_cycle()
            elif event is http11.NEED_DATA:
                break
            elif event is http11.CONNECTION_CLOSED:
                return done
    return done


def splits(data: bytes, seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    out, i = [], 0
    while i < len(data):
        n = rnd.randint(1, 64)
        out.append(data[i:i + n])
        i += n
    return out


def normalise(expected) -> list[dict]:
    reqs = expected if isinstance(expected, list) else [expected]
    out = []
    for req in reqs:
        req = dict(req)
        if isinstance(req["body"], str):
            req["body"] = req["body"].encode("latin-1")
        req["headers"] = [tuple(h) for h in req["headers"]]
        if "trailers" in req:
            req["trailers"] = [tuple(h) for h in req["trailers"]]
        out.append(req)
    return out


def has_one_host(req: dict) -> bool:
    return sum(1 for n, _ in req["headers"] if n == "HOST") == 1


@pytest.mark.parametrize(("prefix", "kind", "http"), CASES)
def test_case(prefix: str, kind: str, http: Path) -> None:
    key = f"{kind}/{http.stem}"
    if not prefix and key in SKIPPED:
        pytest.skip(SKIPPED[key])
    data = decode_http(http.read_text(encoding="latin-1"))
    expected, settings = load_expectation(http.with_suffix(".py"))
    unknown = settings.keys() - KNOWN_OPTIONS
    proxy = bool(settings.get("proxy_protocol"))
    # Our own cases run with the default (strict) Host rule; gunicorn's corpus has
    # many HTTP/1.1 requests without Host, so it runs with the rule off (see below).
    require_host = bool(prefix)
    if kind == "invalid" or (not prefix and key in STRICTER):
        if kind == "valid":
            assert unknown or key in STRICTER
        for chunks in ([data], [bytes([b]) for b in data], splits(data, 1)):
            conn = connection_for(settings, require_host=require_host)
            with pytest.raises((http11.RemoteProtocolError, ProxyRejected)) as info:
                run(conn, chunks, eof=True, proxy=proxy)
            if proxy and key.startswith(("valid/pp_", "invalid/pp_")):
                assert info.type is ProxyRejected   # these cases are about the header
            else:
                assert info.type is http11.RemoteProtocolError
                assert info.value.status in (400, 413, 414, 431)
        return
    assert not unknown, f"unhandled gunicorn options {unknown}"
    want = normalise(expected)
    for chunks in ([data], [bytes([b]) for b in data], splits(data, 1), splits(data, 7)):
        conn = connection_for(settings, require_host=require_host)
        assert run(conn, chunks, eof=True, proxy=proxy) == want
    # Trailing bytes: a partial next request is kept verbatim, unparsed.
    tail = b"GET /next HTTP/1.1\r\nHo"
    conn = connection_for(settings, require_host=require_host)
    got = run(conn, [data + tail], eof=False, proxy=proxy)
    assert got == want
    last = want[-1]
    closes = (last["version"] == (1, 0) and ("CONNECTION", "keep-alive") not in
              [(n, v.lower()) for n, v in last["headers"]]) or any(
        n == "CONNECTION" and "close" in v.lower() for n, v in last["headers"])
    closes = closes or last["method"] == "CONNECT"   # no tunnels: closes after answering
    if not closes:
        assert conn.idle
        assert conn.unparsed_bytes() == tail


@pytest.mark.parametrize(("prefix", "kind", "http"),
                         [c for c in CASES if c.values[1] == "valid" and not c.values[0]])
def test_host_rule(prefix: str, kind: str, http: Path) -> None:
    """With the default strictness, HTTP/1.1 requests need exactly one Host."""
    key = f"{kind}/{http.stem}"
    if key in SKIPPED or key in STRICTER:
        pytest.skip("covered by test_case")
    data = decode_http(http.read_text(encoding="latin-1"))
    expected, settings = load_expectation(http.with_suffix(".py"))
    want = normalise(expected)
    proxy = bool(settings.get("proxy_protocol"))
    conn = connection_for(settings, require_host=True)
    ok = [r for r in want if r["version"] == (1, 0) or has_one_host(r)]
    if len(ok) == len(want):
        assert run(conn, [data], eof=True, proxy=proxy) == want
    else:
        with pytest.raises(http11.RemoteProtocolError):
            run(conn, [data], eof=True, proxy=proxy)


def test_corpus_present() -> None:
    assert (CORPUS / "valid").is_dir(), f"corpus not found at {CORPUS}"
    assert len([c for c in CASES if not c.values[0]]) >= 130
