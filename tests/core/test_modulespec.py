"""The `module` grammar, and its two readers: the config reader judges a spec with it,
the worker's loader follows it, so they accept exactly the same specs."""
from __future__ import annotations

import pytest

from supervisor.config.model import ConfigError
from supervisor.config.modulespec import ModuleSpec, parse
from supervisor.config.reader import from_mapping
from supervisor.worker import appload

VALID = [
    ("app:app", ModuleSpec("app", ("app",), False)),
    ("pkg.mod:app", ModuleSpec("pkg.mod", ("app",), False)),
    ("pkg.mod:obj.attr", ModuleSpec("pkg.mod", ("obj", "attr"), False)),
    ("pkg.mod:create_app()", ModuleSpec("pkg.mod", ("create_app",), True)),
    ("pkg.mod:Factory.build()", ModuleSpec("pkg.mod", ("Factory", "build"), True)),
    ("_private._m:_app", ModuleSpec("_private._m", ("_app",), False)),
    ("v2.app1:wsgi_2", ModuleSpec("v2.app1", ("wsgi_2",), False)),
    ("caf\u00e9:app", ModuleSpec("caf\u00e9", ("app",), False)),   # Python identifiers, not only ASCII
]

INVALID = [
    "",
    "shop",
    "shop:",
    ":app",
    "pkg.mod",
    "pkg..mod:app",
    ".pkg:app",
    "pkg.:app",
    "pkg:app.",
    "pkg:.app",
    "pkg:obj..attr",
    "pkg:app()()",
    "pkg:app(1)",
    "pkg:app (",
    "pkg:app ()",
    "pkg:()",
    "pkg:app:other",
    "1pkg:app",
    "pkg:1app",
    "pkg-mod:app",
    "pkg/mod:app",
    " pkg:app",
    "pkg:app ",
    "pkg:app\n",       # a regex anchored with `$` lets this through
    "pkg:app()\n",
    "pkg:a-b",
]


@pytest.mark.parametrize("text, expected", VALID + [(text, None) for text in INVALID])
def test_parse(text, expected):
    """None: refused, with a ValueError."""
    if expected is None:
        pytest.raises(ValueError, parse, text)
    else:
        assert parse(text) == expected


def _config_accepts(module: str) -> bool:
    data = {"listeners": {"web": {"bind": "127.0.0.1:8000"}},
            "apps": {"blog": {"module": module, "listeners": ["web"]}}}
    try:
        from_mapping(data, None, running_as_root=False, base_dir="/")
    except ConfigError as exc:
        assert all("apps.blog.module: expected 'pkg.mod:callable' or 'pkg.mod:factory()'" in line
                   for line in exc.problems), exc.problems
        return False
    return True


@pytest.mark.parametrize("text", [text for text, _ in VALID] + INVALID)
def test_the_config_and_the_loader_accept_the_same_specs(text):
    accepted = _config_accepts(text)
    assert accepted == (text in dict(VALID))
    if not accepted:
        with pytest.raises(appload.AppLoadError, match="is not MODULE:CALLABLE or MODULE:FACTORY()"):
            appload.load(text)


@pytest.mark.parametrize("text", ["tests.apps.probe:app", "tests.apps.probe:create_app()",
                                  "tests.apps.probe:app.__call__"])
def test_the_loader_follows_a_spec_to_a_callable(text):
    assert callable(appload.load(text))


def test_the_loader_names_a_missing_attribute():
    with pytest.raises(appload.AppLoadError, match="module 'tests.apps.probe' has no attribute 'nope.app'"):
        appload.load("tests.apps.probe:nope.app")
