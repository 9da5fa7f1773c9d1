"""Access-log formats: every gunicorn atom, in text and JSON, escaping, and errors
that name the bad atom."""
from __future__ import annotations

import base64
import json
import os

import pytest

from supervisor.http.accesslog import (
    ATOMS,
    DEFAULT_FORMAT,
    DEFAULT_JSON_FORMAT,
    AccessFormatError,
    AccessRecord,
    compile_format,
)

NOW = 971186136.25   # 2000-10-10 13:55:36.250 UTC


def clock() -> float:
    return NOW


def record(**changes) -> AccessRecord:
    fields = dict(
        peer=("203.0.113.7", 51234), method=b"GET", target=b"/a%20b?x=1&y=2", path=b"/a%20b",
        query=b"x=1&y=2", version="1.1", status="200", length=1234,
        request_headers=[(b"Host", b"example.test"), (b"User-Agent", b"curl/8.0"),
                         (b"Referer", b"https://ref.test/"), (b"X-Request-Id", b"abc-123"),
                         (b"Authorization", b"Basic " + base64.b64encode(b"alice:secret"))],
        response_headers=[("Content-Type", "text/plain"), ("X-Served-By", "w1")],
        started=100.0, finished=101.2345678, environ={"REMOTE_USER": "bob", "wsgi.version": (1, 0)},
    )
    fields.update(changes)
    return AccessRecord(**fields)


def text(fmt: str, rec: AccessRecord | None = None) -> str:
    return compile_format(fmt, wall_clock=clock)(rec or record())


def as_json(fmt: str, rec: AccessRecord | None = None) -> dict:
    line = compile_format(fmt, json=True, wall_clock=clock)(rec or record())
    assert "\n" not in line
    return json.loads(line)


ATOM_CASES = [
    # (atom, text, JSON value)
    ("h", "203.0.113.7", "203.0.113.7"),
    ("l", "-", None),
    ("u", "alice", "alice"),
    ("t", "[10/Oct/2000:13:55:36 +0000]", "2000-10-10T13:55:36.250Z"),
    ("r", "GET /a%20b?x=1&y=2 HTTP/1.1", "GET /a%20b?x=1&y=2 HTTP/1.1"),
    ("m", "GET", "GET"),
    ("U", "/a%20b", "/a%20b"),
    ("q", "x=1&y=2", "x=1&y=2"),
    ("H", "HTTP/1.1", "HTTP/1.1"),
    ("s", "200", 200),
    ("B", "1234", 1234),
    ("b", "1234", 1234),
    ("f", "https://ref.test/", "https://ref.test/"),
    ("a", "curl/8.0", "curl/8.0"),
    ("T", "1", 1),
    ("M", "1234", 1234.568),
    ("D", "1234567", 1234567),
    ("L", "1.234568", 1.234568),
    ("p", f"<{os.getpid()}>", os.getpid()),
]


@pytest.mark.parametrize("atom, expected_text, expected_json", ATOM_CASES, ids=[c[0] for c in ATOM_CASES])
def test_each_atom(atom, expected_text, expected_json):
    assert text(f"%({atom})s") == expected_text
    assert as_json(f"%({atom})s") == {ATOMS[atom][0]: expected_json}


def test_every_atom_is_covered():
    assert {case[0] for case in ATOM_CASES} == set(ATOMS)


def test_default_format_is_gunicorns():
    assert DEFAULT_FORMAT == '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'
    assert text(DEFAULT_FORMAT) == ('203.0.113.7 - alice [10/Oct/2000:13:55:36 +0000] '
                                    '"GET /a%20b?x=1&y=2 HTTP/1.1" 200 1234 "https://ref.test/" "curl/8.0"')


def test_default_json_format_has_the_long_names():
    assert as_json(DEFAULT_JSON_FORMAT) == {
        "time": "2000-10-10T13:55:36.250Z", "remote_addr": "203.0.113.7", "user": "alice", "method": "GET",
        "path": "/a%20b", "query": "x=1&y=2", "protocol": "HTTP/1.1", "status": 200, "bytes": 1234,
        "referer": "https://ref.test/", "user_agent": "curl/8.0", "duration_ms": 1234.568, "pid": os.getpid()}


def test_headers_and_environ_atoms():
    fmt = "%({x-request-id}i)s %({Content-Type}o)s %({REMOTE_USER}e)s %({wsgi.version}e)s %({missing}i)s"
    assert text(fmt) == "abc-123 text/plain bob (1, 0) -"
    assert as_json(fmt) == {"request_headers": {"x-request-id": "abc-123", "missing": None},
                            "response_headers": {"content-type": "text/plain"},
                            "environ": {"REMOTE_USER": "bob", "wsgi.version": "(1, 0)"}}


def test_first_of_repeated_headers_wins():
    rec = record(request_headers=[(b"user-agent", b"one"), (b"USER-AGENT", b"two")])
    assert text("%(a)s") == "curl/8.0" and text("%(a)s", rec) == "one"


def test_needs_flags_say_what_to_capture():
    plain = compile_format(DEFAULT_FORMAT)
    assert (plain.needs_environ, plain.needs_response_headers) == (False, False)
    rich = compile_format("%({x}o)s %({Y}e)s", json=True)
    assert (rich.needs_environ, rich.needs_response_headers) == (True, True)


def test_a_refused_request_without_head_or_environ():
    rec = AccessRecord.for_request(None, None, "400", 0)
    assert text(DEFAULT_FORMAT + " %(q)s %({x}o)s %({X}e)s %(M)s", rec) == \
        '- - - [10/Oct/2000:13:55:36 +0000] "-" 400 - "-" "-" - - - 0'
    assert as_json("%(h)s %(r)s %(b)s %(U)s %({X}e)s %(M)s", rec) == {
        "remote_addr": None, "request": None, "bytes": 0, "path": None, "environ": {"X": None}, "duration_ms": 0.0}


def test_for_request_copies_the_parsed_head():
    class Head:   # the attributes of http11.Request it reads
        method, target, path, query, version = b"POST", b"/p?q", b"/p", b"q", "1.0"
        headers = [(b"User-Agent", b"ua")]
    rec = AccessRecord.for_request("/run/web.sock", Head(), "201", 5, 1.0, 1.5, [("X", "y")], {"A": "b"})
    assert text('%(h)s "%(r)s" %(a)s %(M)s %({x}o)s %({A}e)s', rec) == '/run/web.sock "POST /p?q HTTP/1.0" ua 500 y b'


def test_empty_query_is_empty_as_in_gunicorn():
    assert text("[%(q)s]", record(query=b"")) == "[]"


@pytest.mark.parametrize("authorization", [
    b"Bearer abc", b"Basic !!!notbase64", b"Basic " + base64.b64encode(b"no-colon"),
    b"Basic " + base64.b64encode(b":nouser"),
])
def test_user_is_dash_without_usable_basic_auth(authorization):
    rec = record(request_headers=[(b"Authorization", authorization)])
    assert text("%(u)s", rec) == "-"
    assert as_json("%(u)s", rec) == {"user": None}


def test_peer_values_are_escaped_so_no_line_can_be_forged():
    rec = record(request_headers=[(b"User-Agent", b'evil"\r\n1.2.3.4 - - "GET / \\ \x7f\x85')],
                 response_headers=[("X-Served-By", "a\nb")])
    line = text('"%(a)s" %({x-served-by}o)s', rec)
    assert line == '"evil\\"\\x0d\\x0a1.2.3.4 - - \\"GET / \\\\ \\x7f\\x85" a\\x0ab'
    assert "\n" not in line and "\r" not in line
    assert as_json("%(a)s", rec)["user_agent"] == 'evil"\r\n1.2.3.4 - - "GET / \\ \x7f\x85'


def test_literal_text_and_percent():
    assert text("100%% of %(m)s: {%(s)s}") == "100% of GET: {200}"
    assert text("no atoms at all") == "no atoms at all"
    assert as_json("ignored %(s)s literal") == {"status": 200}


def test_time_is_rendered_again_when_the_second_changes():
    now = [NOW]
    line = compile_format("%(t)s", wall_clock=lambda: now[0])
    assert line(record()) == "[10/Oct/2000:13:55:36 +0000]"
    now[0] += 86400 * 31 + 1
    assert line(record()) == "[10/Nov/2000:13:55:37 +0000]"
    iso = compile_format("%(t)s", json=True, wall_clock=lambda: now[0])
    assert json.loads(iso(record())) == {"time": "2000-11-10T13:55:37.250Z"}


def test_negative_durations_read_zero():
    assert text("%(T)s %(M)s %(D)s %(L)s", record(started=5.0, finished=4.0)) == "0 0 0 0.000000"


@pytest.mark.parametrize("fmt, message", [
    ("%(x)s", "unknown atom %(x)s"),
    ("%(h)s %(hh)s", "unknown atom %(hh)s"),
    ("%({}i)s", "unknown atom %({}i)s"),
    ("%({a}x)s", "unknown atom %({a}x)s"),
    ("%({a b\n}i)s", "unknown atom"),
    ("%(h)d", "%(h)d must end with 's'"),
    ("%(h)", "%(h) must end with 's'"),
    ("%s", "starts no atom"),
    ("50% %(h)s", "'%' at offset 2 starts no atom"),
    ("%(h", "starts no atom"),
    ("trailing %", "starts no atom"),
])
def test_bad_formats_name_the_problem(fmt, message):
    with pytest.raises(AccessFormatError) as info:
        compile_format(fmt)
    assert message in str(info.value)
    with pytest.raises(AccessFormatError):
        compile_format(fmt, json=True)


def test_unknown_atom_error_lists_the_known_ones():
    with pytest.raises(AccessFormatError) as info:
        compile_format("%(z)s")
    assert "known atoms: h l u t r m U q H s B b f a T M D L p {header}i {header}o {variable}e" in str(info.value)


def test_access_format_error_is_a_value_error():
    assert issubclass(AccessFormatError, ValueError)
    with pytest.raises(AccessFormatError):
        compile_format(None)  # type: ignore[arg-type]
