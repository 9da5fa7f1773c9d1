"""What the watcher reports (supervisor.watch.topics): a debouncer driven by a fake
clock, and glob matching as a table and against glob.glob on a real tree."""
from __future__ import annotations

import glob
import os

import pytest

from supervisor.config.reader import from_mapping
from supervisor.watch.topics import (
    Debouncer,
    Watch,
    compile_glob,
    matches,
    minimal_roots,
    root_of,
    translate,
    watch_for,
)

# -- Debouncer ------------------------------------------------------------------------


def test_one_burst_is_one_report():
    debouncer = Debouncer(0.2)
    assert debouncer.deadline() is None and not debouncer.due(100.0)
    # An editor's save: write, close, rename of the temp file over the target, chmod.
    for now, path in [(10.00, "/c/.baton.toml.tmp"), (10.01, "/c/baton.toml"), (10.05, "/c/baton.toml"),
                      (10.15, "/c/baton.toml")]:
        debouncer.note(path, now)
        assert not debouncer.due(now)
    assert debouncer.deadline() == pytest.approx(10.35)
    assert not debouncer.due(10.34)
    assert debouncer.due(10.35)
    assert debouncer.take() == ["/c/.baton.toml.tmp", "/c/baton.toml"]
    assert debouncer.deadline() is None and not debouncer.due(99.0) and debouncer.take() == []


def test_two_saves_further_apart_than_quiet_are_two_reports():
    debouncer = Debouncer(0.2)
    reports = []
    for now, path in [(1.0, "/a"), (1.1, "/b"), (1.5, "/b"), (1.6, "/c")]:
        if debouncer.due(now):
            reports.append(debouncer.take())
        debouncer.note(path, now)
    if debouncer.due(10.0):
        reports.append(debouncer.take())
    assert reports == [["/a", "/b"], ["/b", "/c"]]


# -- globs ------------------------------------------------------------------------------

GLOBS = [
    # (pattern, path, matches)
    ("/c/apps.d/*.toml", "/c/apps.d/blog.toml", True),
    ("/c/apps.d/*.toml", "/c/apps.d/sub/blog.toml", False),
    ("/c/apps.d/*.toml", "/c/apps.d/.#blog.toml", False),        # an emacs lock file
    ("/c/apps.d/*.toml", "/c/apps.d/blog.toml.swp", False),
    ("/c/apps.d/.*.toml", "/c/apps.d/.hidden.toml", True),       # a dot in the pattern allows it
    ("/c/src/**/*.py", "/c/src/mod.py", True),                   # ** matches zero directories
    ("/c/src/**/*.py", "/c/src/pkg/mod.py", True),
    ("/c/src/**/*.py", "/c/src/pkg/sub/deep/mod.py", True),
    ("/c/src/**/*.py", "/c/src/.venv/lib/mod.py", False),        # nor hidden directories
    ("/c/src/**/*.py", "/c/src/pkg/mod.pyc", False),
    ("/c/src/**/*.py", "/c/other/mod.py", False),
    ("/c/src/**", "/c/src/pkg/data.json", True),
    ("/c/src/**", "/c/src", True),
    ("/c/src/*/x.py", "/c/src/a/x.py", True),
    ("/c/src/*/x.py", "/c/src/a/b/x.py", False),
    ("/c/src/**/x.py", "/c/src/a/b/x.py", True),
    ("/c/src/a**.py", "/c/src/a/b.py", False),                   # ** inside a name is just *
    ("/c/src/a**.py", "/c/src/abc.py", True),
    ("/c/?.py", "/c/a.py", True),
    ("/c/?.py", "/c/ab.py", False),
    ("/c/[ab].py", "/c/b.py", True),
    ("/c/[!ab].py", "/c/b.py", False),
    ("/c/[!ab].py", "/c/c.py", True),
    ("/c/[a-c].py", "/c/b.py", True),
    ("/c/[c-a].py", "/c/b.py", False),                            # a reversed range matches nothing
    ("/c/[]].py", "/c/].py", True),
    ("/c/[!]].py", "/c/a.py", True),
    ("/c/[.py", "/c/[.py", True),                                # an unclosed [ is literal
    ("/c/[+-0]", "/c/+", True),
    ("/c/a[+-0]b", "/c/a/b", False),                              # a class never matches /
    ("/c/[&&~|]x", "/c/&x", True),
    ("/c/a.b(c)+$^.py", "/c/a.b(c)+$^.py", True),                # regex characters are literal
    ("/c/a.b", "/c/axb", False),
    ("/c/./d/../e/*.py", "/c/e/f.py", True),
]


@pytest.mark.parametrize("pattern, path, expected", GLOBS)
def test_glob_matching(pattern, path, expected):
    assert bool(compile_glob(pattern).fullmatch(path)) is expected


def test_relative_glob_is_refused():
    with pytest.raises(ValueError, match="absolute"):
        translate("src/*.py")


TREE = ["apps.d/a.toml", "apps.d/b.toml", "apps.d/.#a.toml", "apps.d/sub/c.toml", "src/m.py", "src/pkg/n.py",
        "src/pkg/deep/o.py", "src/pkg/data.txt", "src/.venv/lib/p.py", "src/pkg/.hidden/q.py", "src/.r.py",
        "x[1].py", "x1.py", "readme"]


@pytest.mark.parametrize("pattern", [
    "apps.d/*.toml", "apps.d/**/*.toml", "src/**/*.py", "src/**", "src/*/*.py", "src/*", "**/*.py", "*",
    "src/.*.py", "src/.*/**/*.py", "x[1].py", "x[!a-z].py", "src/pkg/**/*", "src/p?g/*.py",
])
def test_glob_matching_agrees_with_glob_glob(tmp_path, pattern):
    """What the watcher reports must be what config.load includes (via glob.glob)."""
    for name in TREE:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    everything = {str(tmp_path)} | {os.path.join(d, n) for d, dirs, files in os.walk(tmp_path) for n in dirs + files}
    absolute = f"{tmp_path}/{pattern}"
    expected = {os.path.normpath(p) for p in glob.glob(absolute, recursive=True)}
    regex = compile_glob(absolute)
    assert {path for path in everything if regex.fullmatch(path)} == expected


@pytest.mark.parametrize("pattern, root", [
    ("/etc/baton/baton.toml", ("/etc/baton", False)),
    ("/etc/baton/apps.d/*.toml", ("/etc/baton/apps.d", False)),
    ("/srv/blog/src/**/*.py", ("/srv/blog/src", True)),
    ("/srv/blog/src/**", ("/srv/blog/src", True)),
    ("/srv/blog/*/settings.py", ("/srv/blog", True)),
    ("/*.toml", ("/", False)),
    ("/etc/x[1]/a.toml", ("/etc", True)),
])
def test_root_of(pattern, root):
    assert root_of(pattern) == root


def test_minimal_roots_drop_what_a_recursive_root_covers():
    assert minimal_roots([("/a", False), ("/a", True), ("/a/b", False), ("/a/c", True), ("/ab", False),
                          ("/d", False), ("/d/e", False)]) == [("/a", True), ("/ab", False), ("/d", False),
                                                                ("/d/e", False)]
    assert minimal_roots([("/", True), ("/x", False)]) == [("/", True)]


WATCH = Watch(files=("/etc/baton/baton.toml", "/etc/baton/apps.d/blog.toml"),
              config_globs=("/etc/baton/apps.d/*.toml",),
              app_globs={"blog": ("/srv/blog/src/**/*.py", "/srv/blog/*.ini"), "shop": ("/srv/**/*.py",)})


@pytest.mark.parametrize("path, topics", [
    ("/etc/baton/baton.toml", ["config"]),
    ("/etc/baton/./baton.toml", ["config"]),
    (b"/etc/baton/baton.toml", ["config"]),
    ("/etc/baton/apps.d/new.toml", ["config"]),
    ("/etc/baton/baton.toml.tmp", []),
    ("/etc/baton/other.toml", []),
    ("/srv/blog/src/pkg/mod.py", ["app:blog", "app:shop"]),
    ("/srv/blog/prod.ini", ["app:blog"]),
    ("/srv/shop/app.py", ["app:shop"]),
    ("/srv/blog/src/pkg/mod.pyc", []),
])
def test_matches(path, topics):
    assert matches(WATCH, path) == topics


def test_watch_roots_and_equality():
    assert WATCH.roots() == [("/etc/baton", False), ("/etc/baton/apps.d", False), ("/srv", True)]
    same = Watch(files=("/etc/baton/baton.toml", "/etc/baton/apps.d/blog.toml"),
                 config_globs=("/etc/baton/apps.d/*.toml",),
                 app_globs=(("blog", ("/srv/blog/src/**/*.py", "/srv/blog/*.ini")), ("shop", ("/srv/**/*.py",))))
    assert same == WATCH and hash(same) == hash(WATCH)
    assert Watch(files=("/etc/baton/baton.toml",)) != WATCH


def test_watch_for_a_config(tmp_path):
    (tmp_path / "site").mkdir()
    target = tmp_path / "repo" / "baton.toml"
    target.parent.mkdir()
    target.write_text("")
    (tmp_path / "baton.toml").symlink_to(target)
    data = {"master": {"include": ["apps.d/*.toml"]},
            "listeners": {"web": {"bind": "unix:web.sock"}},
            "apps": {"blog": {"module": "blog:app", "listeners": ["web"], "chdir": "site",
                              "reload_on": ["src/**/*.py"]},
                     "shop": {"module": "shop:app", "listeners": ["web"], "hosts": ["shop"], "default": True}}}
    data["apps"]["blog"]["hosts"] = ["blog"]
    config = from_mapping(data, str(tmp_path / "baton.toml"), running_as_root=False)
    watch = watch_for(config)
    assert watch.files == (str(tmp_path / "baton.toml"), str(target))
    assert watch.config_globs == (str(tmp_path / "apps.d/*.toml"),)
    assert watch.app_globs == (("blog", (str(tmp_path / "site/src/**/*.py"),)),)
    assert matches(watch, str(target)) == ["config"]
