"""Host routing per request in the worker (http.hostcheck): the same answers as the balancer's."""
import pytest

from supervisor.balancer import routing
from supervisor.balancer.routing import build_routes
from supervisor.http import hostcheck
from supervisor.http import protocol as http11

PAYLOAD = {
    "listeners": {"web": ("a", "b", "c"), "solo": ("a",), "other": ("b", "c")},
    "proxy": ("web", "other"),
    "apps": {
        "a": {"hosts": ("a.example", "*.a.example"), "default": False, "balance": "round-robin"},
        "b": {"hosts": ("b.example",), "default": True, "balance": "least-connections"},
        "c": {"hosts": ("c.example",), "default": False, "balance": "random-two"},
    },
}


def test_routes_for_keeps_only_the_shared_listeners_of_the_app():
    assert hostcheck.routes_for(PAYLOAD, "a") == {
        "listeners": {"web": ("a", "b", "c")},   # "solo" serves a alone: nothing to check
        "proxy": ("web",),
        "apps": {name: PAYLOAD["apps"][name] for name in ("a", "b", "c")},
    }
    assert set(hostcheck.routes_for(PAYLOAD, "c")["listeners"]) == {"web", "other"}
    assert hostcheck.host_tables(PAYLOAD, "a").keys() == {"web"}
    assert hostcheck.host_tables({"listeners": {}, "proxy": (), "apps": {}}, "a") == {}


def request(head: bytes) -> http11.Request:
    conn = http11.Connection()
    conn.receive_data(head)
    event = conn.next_event()
    assert type(event) is http11.Request, event
    return event


def head(host: str | None, target: str = "/", version: str = "1.1") -> bytes:
    fields = f"Host: {host}\r\n" if host is not None else ""
    return f"GET {target} HTTP/{version}\r\n{fields}\r\n".encode("latin-1")


# (app the connection went to, the request's head, misdirected?)
CASES = [
    ("a", head("a.example"), False),
    ("a", head("A.Example.:8080"), False),                 # case, trailing dot and port: normalised
    ("a", head("x.y.a.example"), False),                   # wildcard
    ("a", head("b.example"), True),
    ("a", head("nobody.example"), True),                    # b is the default
    ("b", head("nobody.example"), False),
    ("a", head("c.example"), True),
    ("c", head("c.example"), False),
    ("a", head(None, version="1.0"), True),                 # no host: the default's
    ("b", head(None, version="1.0"), False),
    ("a", head("", version="1.1"), True),                   # empty Host: the default's
    ("a", head("a.example", "http://b.example/x"), True),   # the absolute target names the host
    ("b", head("a.example", "http://b.example/x"), False),
    ("a", head("b.example", "http://a.example/x"), False),
]


@pytest.mark.parametrize("app,raw,misdirected", CASES)
def test_a_request_is_misdirected_exactly_when_the_balancer_would_route_it_elsewhere(app, raw, misdirected):
    table = hostcheck.host_tables(PAYLOAD, app)["web"]
    gate = hostcheck.HostGate(table, app)
    assert (gate.misdirected(request(raw)) is not None) is misdirected
    # The balancer, peeking at the same bytes as a first request, decides the same.
    peek = routing.peek_host(raw)
    balancer_app = build_routes(PAYLOAD)["web"].hosts.match(peek.host) if peek.status != "invalid" else None
    assert (balancer_app != app) is misdirected


def test_a_connection_whose_host_changes_is_checked_again():
    table = hostcheck.host_tables(PAYLOAD, "a")["web"]
    gate = hostcheck.HostGate(table, "a")
    assert gate.misdirected(request(head("a.example"))) is None
    assert gate.misdirected(request(head("a.example"))) is None       # the same Host: no lookup
    said = gate.misdirected(request(head("b.example")))
    assert said is not None and "b.example" in said and "app b" in said
    assert gate.misdirected(request(head("www.a.example"))) is None
    assert gate.misdirected(request(head("c.example"))) is not None


def test_the_same_host_value_with_an_absolute_target_is_not_taken_from_the_cache():
    gate = hostcheck.HostGate(hostcheck.host_tables(PAYLOAD, "a")["web"], "a")
    assert gate.misdirected(request(head("a.example"))) is None
    assert gate.misdirected(request(head("a.example", "http://b.example/"))) is not None


def test_request_host_is_what_peek_host_decides_for_a_whole_head():
    for raw in (head("a.example"), head("[::1]:80"), head(None, version="1.0"), head("a.example", "http://b/")):
        req = request(raw)
        host_value = dict((n.lower(), v) for n, v in req.headers).get(b"host")
        minor = 0 if req.version == "1.0" else 1
        assert routing.request_host(host_value, req.target, minor) == routing.peek_host(raw)
