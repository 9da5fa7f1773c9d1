"""The file watcher: a debouncer driven by a fake clock, glob matching as a table (and
against glob.glob on a real tree), and run_watcher on real directories.

The real-filesystem tests never sleep to synchronise and never assert on timing: they
wait for reports, and prove that something was *not* reported by making a sentinel
change afterwards and checking that the sentinel's report is the next one.
"""
from __future__ import annotations

import glob
import os
import queue
import threading
from pathlib import Path
from types import MappingProxyType

import pytest

from supervisor.config.reader import from_mapping
from supervisor.watch.watcher import (
    WATCHDOG_DOUBLE_ADD,
    Debouncer,
    Watch,
    compile_glob,
    matches,
    minimal_roots,
    root_of,
    run_watcher,
    translate,
    watch_for,
)

# watchdog's inotify thread warns when a fresh directory tree is added to a recursive
# watch twice (harmless); with warnings as errors that would kill its thread. `main`
# ignores it the same way in the watcher process.
pytestmark = pytest.mark.filterwarnings(f"ignore:{WATCHDOG_DOUBLE_ADD}:RuntimeWarning")

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


# -- run_watcher on real directories ------------------------------------------------------


class Running:
    """run_watcher in a thread; reports land in a queue."""

    def __init__(self, watch: Watch, quiet_s: float = 0.2):
        self.reports: queue.Queue = queue.Queue()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._stop_read, self._stop_write = os.pipe()
        self.thread = threading.Thread(target=self._run, args=(watch, quiet_s), daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "the watcher never became ready"
        assert self.error is None, self.error

    def _run(self, watch: Watch, quiet_s: float) -> None:
        try:
            run_watcher(watch, self.reports.put, stop_fd=self._stop_read, quiet_s=quiet_s, on_ready=self.ready.set)
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    def next_report(self, timeout: float = 10.0) -> list[str]:
        try:
            return self.reports.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no report within {timeout}s") from None

    def stop(self) -> None:
        os.close(self._stop_write)  # EOF on stop_fd
        self.thread.join(10)
        assert not self.thread.is_alive(), "the watcher did not stop"
        os.close(self._stop_read)
        assert self.error is None, self.error


@pytest.fixture
def site(tmp_path):
    """A config dir with an include dir and an app tree, plus a sentinel app."""
    (tmp_path / "baton.toml").write_text("# v1\n")
    (tmp_path / "apps.d").mkdir()
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "pkg" / "mod.py").write_text("x = 1\n")
    (tmp_path / "sentinel").mkdir()
    return tmp_path


def site_watch(site: Path, **changes) -> Watch:
    fields = dict(files=(str(site / "baton.toml"),), config_globs=(str(site / "apps.d/*.toml"),),
                  app_globs=MappingProxyType({"blog": (str(site / "src/**/*.py"),),
                                              "sentinel": (str(site / "sentinel/*.txt"),)}))
    return Watch(**{**fields, **changes})


@pytest.fixture
def watching(site):
    started = []

    def start(watch: Watch | None = None) -> Running:
        started.append(Running(watch or site_watch(site)))
        return started[-1]
    yield start
    for running in started:
        running.stop()


def then_only_the_sentinel(running: Running, site: Path, name: str = "s.txt") -> None:
    """Nothing else is reported before a change made now."""
    (site / "sentinel" / name).write_text("poke\n")
    assert running.next_report() == ["app:sentinel"]


def test_in_place_write_of_the_config_is_one_report(site, watching):
    running = watching()
    with open(site / "baton.toml", "w") as file:  # truncate, write, close: several events
        file.write("# v2\n")
        file.flush()
        file.write("# more\n")
    os.chmod(site / "baton.toml", 0o600)
    assert running.next_report() == ["config"]
    then_only_the_sentinel(running, site)


def test_temp_file_renamed_over_the_config_is_one_report_and_the_watch_stays(site, watching):
    running = watching()
    for version in (2, 3):  # the second save proves the watch survived the inode change
        temp = site / f".baton.toml.{version}.tmp"
        temp.write_text(f"# v{version}\n")
        os.replace(temp, site / "baton.toml")
        assert running.next_report() == ["config"]
        then_only_the_sentinel(running, site, f"s{version}.txt")


def test_new_file_matching_an_include_glob(site, watching):
    running = watching()
    (site / "apps.d" / "shop.toml").write_text("[apps.shop]\n")
    assert running.next_report() == ["config"]
    then_only_the_sentinel(running, site)


def test_include_directory_created_after_start(site, watching):
    (site / "apps.d").rmdir()
    running = watching()
    (site / "apps.d").mkdir()
    (site / "apps.d" / "shop.toml").write_text("[apps.shop]\n")
    assert running.next_report() == ["config"]
    (site / "apps.d" / "wiki.toml").write_text("[apps.wiki]\n")  # and the new directory is watched
    assert running.next_report() == ["config"]
    then_only_the_sentinel(running, site)


def test_change_deep_under_a_recursive_glob(site, watching):
    running = watching()
    (site / "src" / "pkg" / "mod.py").write_text("x = 2\n")
    assert running.next_report() == ["app:blog"]
    (site / "src" / "pkg" / "new" / "deeper").mkdir(parents=True)
    (site / "src" / "pkg" / "new" / "deeper" / "fresh.py").write_text("y = 1\n")
    assert running.next_report() == ["app:blog"]
    then_only_the_sentinel(running, site)


def test_app_tree_replaced_by_a_new_directory(site, watching):
    """A checkout that deletes and re-creates the tree: the new one is watched."""
    running = watching()
    old = site / "src"
    old.rename(site / "src.old")
    (site / "src" / "pkg").mkdir(parents=True)
    (site / "src" / "pkg" / "mod.py").write_text("x = 3\n")
    assert running.next_report() == ["app:blog"]
    (site / "src" / "pkg" / "mod.py").write_text("x = 4\n")
    assert running.next_report() == ["app:blog"]
    then_only_the_sentinel(running, site)


def test_unrelated_files_and_reads_report_nothing(site, watching):
    running = watching()
    (site / "notes.txt").write_text("hello\n")
    (site / "apps.d" / "shop.toml.swp").write_text("swap\n")
    (site / "apps.d" / ".#shop.toml").write_text("lock\n")
    (site / "src" / "pkg" / "mod.pyc").write_bytes(b"\0")
    (site / "src" / ".venv" / "lib").mkdir(parents=True)
    (site / "src" / ".venv" / "lib" / "dep.py").write_text("")
    (site / "baton.toml").read_text()  # the master reading its config is no change
    (site / "src" / "pkg" / "mod.py").read_text()  # nor a worker importing its code
    then_only_the_sentinel(running, site)


def test_two_watchers_in_one_process(site, watching):
    first, second = watching(), watching(site_watch(site, files=()))
    (site / "baton.toml").write_text("# v2\n")
    assert first.next_report() == ["config"]
    then_only_the_sentinel(second, site)
    assert first.next_report() == ["app:sentinel"]


def test_a_failing_report_stops_the_watcher(site):
    stop_read, stop_write = os.pipe()
    ready = threading.Event()
    outcome: list[BaseException] = []

    def report(topics):
        raise RuntimeError(f"channel gone: {topics}")

    def run():
        try:
            run_watcher(site_watch(site), report, stop_fd=stop_read, on_ready=ready.set)
        except RuntimeError as exc:
            outcome.append(exc)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    (site / "baton.toml").write_text("# v2\n")
    thread.join(10)
    assert not thread.is_alive()
    assert [str(exc) for exc in outcome] == ["channel gone: ['config']"]
    os.close(stop_read)
    os.close(stop_write)


def test_main_reports_over_the_channel_and_returns_when_the_master_end_closes(site):
    from supervisor.ipc import channel
    from supervisor.ipc.messages import CHANGED, READY
    from supervisor.watch.watcher import main

    master_end, child_end = channel.pair()
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(main(site_watch(site), child_end)), daemon=True)
    thread.start()
    master_end.settimeout(10)
    ready, fds = channel.receive(master_end)
    assert (ready.kind, fds) == (READY, [])
    (site / "baton.toml").write_text("# changed\n")
    message, fds = channel.receive(master_end)
    assert (message.kind, message["topics"], fds) == (CHANGED, ["config"], [])
    master_end.close()
    thread.join(10)
    assert status == [0]
    child_end.close()
