"""The watcher process (supervisor.watch.watcher): run_watcher on real directories.

These tests never sleep to synchronise and never assert on timing: they wait for
reports, and prove that something was *not* reported by making a sentinel change
afterwards and checking that the sentinel's report is the next one.
"""
from __future__ import annotations

import os
import queue
import threading
from pathlib import Path
from types import MappingProxyType

import pytest

from supervisor.watch.topics import Watch
from supervisor.watch.watcher import WATCHDOG_DOUBLE_ADD, run_watcher

# watchdog's inotify thread warns when a fresh directory tree is added to a recursive
# watch twice (harmless); with warnings as errors that would kill its thread. `main`
# ignores it the same way in the watcher process.
pytestmark = pytest.mark.filterwarnings(f"ignore:{WATCHDOG_DOUBLE_ADD}:RuntimeWarning")


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
    from supervisor.ipc.messages import Changed, Ready
    from supervisor.watch.watcher import main

    master_end, child_end = channel.pair()
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(main(site_watch(site), child_end)), daemon=True)
    thread.start()
    master_end.settimeout(10)
    ready, fds = channel.receive(master_end)
    assert (type(ready), fds) == (Ready, [])
    (site / "baton.toml").write_text("# changed\n")
    message, fds = channel.receive(master_end)
    assert (message, fds) == (Changed(topics=("config",)), [])
    master_end.close()
    thread.join(10)
    assert status == [0]
    child_end.close()
