"""The host-name grammar, and the readers that share it: a `hosts` entry the config
accepts always matches the requests that carry that name, and a bind host passes the
same grammar (kept as written, for the resolver)."""
from __future__ import annotations

import pytest

from supervisor.balancer.routing import HostTable, peek_host
from supervisor.config.binds import parse_bind
from supervisor.config.hostnames import host_pattern, normalise_ipv6, normalise_name
from supervisor.config.model import ConfigError
from supervisor.config.reader import from_mapping

LONGEST = ".".join(["a" * 63] * 3 + ["b" * 61])   # 253 characters

NAMES = [
    # (text, normalised or None)
    ("example.com", "example.com"),
    ("Example.COM", "example.com"),
    ("example.com.", "example.com"),
    ("localhost", "localhost"),
    ("compose_web", "compose_web"),
    ("_dmarc.example.com", "_dmarc.example.com"),
    ("web-1.example.com", "web-1.example.com"),
    ("xn--caf-dma.test", "xn--caf-dma.test"),
    ("1.example.org", "1.example.org"),
    ("a" * 63 + ".test", "a" * 63 + ".test"),
    (LONGEST, LONGEST),
    (LONGEST + ".", LONGEST),
    ("1.2.3.4", "1.2.3.4"),
    ("0.0.0.0", "0.0.0.0"),
    ("255.255.255.255", "255.255.255.255"),
    ("", None),
    (".", None),
    ("..", None),
    ("example.com..", None),
    ("a..b", None),
    (".a", None),
    ("-a.test", None),
    ("a-.test", None),
    ("a b.test", None),
    ("caf\u00e9.test", None),
    ("a" * 64 + ".test", None),
    (LONGEST + "b", None),
    ("999.1.1.1", None),
    ("256.0.0.1", None),
    ("01.2.3.4", None),
    ("1.2.3", None),
    ("127.1", None),        # inet_aton would read 127.0.0.1
    ("0x7f.0.0.1", None),   # inet_aton would read 127.0.0.1
    ("a.123", None),        # no top-level domain is numeric
    ("1.2.3.4.5", None),
    ("x.test:80", None),
    ("*.x.test", None),
    ("[::1]", None),
    ("user@x.test", None),
    ("x.test/", None),
]

IPV6 = [
    ("::1", "::1"),
    ("0:0::1", "::1"),
    ("2001:DB8:0::1", "2001:db8::1"),
    ("::", "::"),
    ("fe80::1%eth0", None),   # a zone means nothing in a Host field
    ("1.2.3.4", None),
    ("::1::", None),
    ("\uff11::1", None),      # FULLWIDTH DIGIT ONE
    ("", None),
]

PATTERNS = [
    ("example.org", ("exact", "example.org")),
    ("Example.ORG.", ("exact", "example.org")),
    ("*.example.org", ("wildcard", "example.org")),
    ("*.Example.org.", ("wildcard", "example.org")),
    ("127.0.0.1", ("exact", "127.0.0.1")),
    ("::1", ("exact", "::1")),
    ("[0::1]", ("exact", "::1")),
    ("compose_web", ("exact", "compose_web")),
]

BAD_PATTERNS = [
    "", "*", "*.", "**.x.test", "a.*.test", "x*.test", "*x.test", "x.test:80", "[::1]:80",
    "a..test", "-a.test", "a b.test", "caf\xe9.test", "*.1.2.3.4", "*.[::1]", "256.0.0.1",
    "[fe80::1%eth0]", "x.test/", "user@x.test", "0x7f.0.0.1", "a.123",
]


@pytest.mark.parametrize("text, expected", NAMES)
def test_normalise_name(text, expected):
    assert normalise_name(text) == expected


@pytest.mark.parametrize("text", ["1.2.3.4", "0.0.0.0", "1.2.3.4."])
def test_normalise_name_without_ipv4(text):
    assert normalise_name(text, allow_ipv4=False) is None


@pytest.mark.parametrize("text, expected", IPV6)
def test_normalise_ipv6(text, expected):
    assert normalise_ipv6(text) == expected


@pytest.mark.parametrize("text, expected", PATTERNS)
def test_host_pattern(text, expected):
    assert host_pattern(text) == expected


# -- the readers agree ---------------------------------------------------------------


def _hosts_problems(hosts: list[str]) -> list[str]:
    """Problems of a config whose only app, alone on its listener, lists `hosts`."""
    data = {"listeners": {"web": {"bind": "127.0.0.1:8000"}},
            "apps": {"blog": {"module": "blog:app", "listeners": ["web"], "hosts": hosts}}}
    try:
        from_mapping(data, None, running_as_root=False, base_dir="/")
    except ConfigError as exc:
        return exc.problems
    return []


@pytest.mark.parametrize("text", [text for text, _ in PATTERNS])
def test_a_hosts_entry_the_config_accepts_matches_the_requests_that_carry_it(text):
    assert _hosts_problems([text]) == []
    kind, name = host_pattern(text)
    table = HostTable([("blog", (text,), False), ("other", ("other.test",), True)])
    carried = f"sub.{name}" if kind == "wildcard" else name
    spellings = [carried, carried.upper(), carried + "."] if ":" not in carried else [f"[{carried}]"]
    for spelling in spellings:
        for authority in (spelling, spelling + ":8080"):
            peek = peek_host(f"GET / HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
            assert table.match(peek.host) == "blog", authority


@pytest.mark.parametrize("text", BAD_PATTERNS)
def test_a_pattern_the_balancer_refuses_is_a_config_problem(text):
    with pytest.raises(ValueError):
        host_pattern(text)
    with pytest.raises(ValueError):
        HostTable([("blog", (text,), False)])
    # Even for an app alone on its listener, where no HostTable is built at load time.
    found = _hosts_problems([text])
    what = "a non-empty string" if not text else "a host name, an IP address or '*.' and a domain, without a port"
    assert len(found) == 1 and f"apps.blog.hosts[0]: expected {what}, found " in found[0]


def _bind_names():
    """The NAMES cases a bind spec reads as a host name: not empty, not digits and dots
    (read as IPv4), nothing a bind spec splits on or that no grammar admits."""
    for text, normalised in NAMES:
        if text and not set(text) <= set("0123456789.") and not set(text) & set(":[]*@/"):
            yield text, normalised


@pytest.mark.parametrize("text, normalised", list(_bind_names()))
def test_a_bind_host_passes_the_same_grammar_and_is_kept_as_written(text, normalised):
    if normalised is None:
        with pytest.raises(ValueError, match="expected a host name or IP address before ':80'"):
            parse_bind(f"{text}:80", "/")
    else:
        assert parse_bind(f"{text}:80", "/").host == text
