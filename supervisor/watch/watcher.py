"""The watcher process: tell the master when the config or an app's code changed on disk.

The master is single-threaded (it forks) and watchdog's observer uses threads, so the
watcher runs in its own small child process (`main`), which reports over its channel
to the master; what counts as a change and when a burst is over is `topics.py`'s.
Its promises:

- It watches *directories*, never files: an editor that saves by writing a temp file
  and renaming it over the target replaces the inode, and a watch on the file itself
  would go deaf after the first save. Events are filtered by path.
- A watched directory that does not exist yet (an empty `apps.d/`), or is deleted and
  created again (a checkout), is picked up when it appears; the matching files found
  in it then count as changed.
- Opening or reading a file is not a change (the master reading its config, a worker
  importing its code), so a reload never triggers itself.
- watchdog's threads only queue events and wake the process's one event loop
  (`supervisor.system.loop`); everything else happens in the loop's thread.
- It needs only to read, so under a root master it gives up root before it watches
  (`main`), unless the identity it is given could not read a watched directory: then
  it says so in the error log and stays root rather than go deaf.
"""
from __future__ import annotations

import os
import queue
import socket
import stat
import time
import warnings
from typing import Callable

from supervisor.system.loop import Loop, Timer
from supervisor.watch.topics import Debouncer, Watch, matches, minimal_roots

WATCHDOG_DOUBLE_ADD = "Callback with id"  # a harmless watchdog warning; see `main`


def import_watchdog() -> None:
    """Import watchdog in the master, before it forks (`watcher_handle.prepare`), so the
    watcher shares these modules copy-on-write. Imported in the forked child they cost
    several times their size: every allocation lands in a page the child shares with
    the master (measured: 3 MB more for the watcher). An import starts no thread: the
    master stays single-threaded."""
    import watchdog.observers  # noqa: F401


# -- the watcher loop -------------------------------------------------------------


def main(watch: Watch, end: socket.socket, identity=None, why: str = "", log=None) -> int:
    """The watcher child: send each report to the master as a CHANGED message; return
    when the master's end closes (the master never writes to this channel).

    With an `identity` (a `privileges.Identity`; `why` says how it was chosen), drop
    to it first if it can list every watched directory; `log` (a logger) hears which
    way it went."""
    import setproctitle

    from supervisor.ipc import channel
    from supervisor.ipc.messages import Changed, Ready

    if identity is not None:
        _become(identity, why, watch, log)
    setproctitle.setproctitle("baton: watcher")
    # watchdog 7 warns from its inotify thread when a new directory tree is added to a
    # recursive watch twice (a benign race); under -W error that warning would kill the
    # thread and leave the watcher deaf. This process is ours alone, so filter globally.
    warnings.filterwarnings("ignore", message=WATCHDOG_DOUBLE_ADD, category=RuntimeWarning)
    end.setblocking(True)
    run_watcher(watch, lambda topics: channel.send(end, Changed(topics=tuple(topics))),
                stop_fd=end.fileno(), on_ready=lambda: channel.send(end, Ready(pid=os.getpid())))
    return 0


def _become(identity, why: str, watch: Watch, log) -> None:
    """Drop to `identity`, or stay root (and say so) if it could not list a watched
    directory: inotify would then skip that directory silently, and a config edit
    there would go unnoticed."""
    from supervisor.system import privileges

    directories = sorted({_existing_directory(path) for path, _ in watch.roots()})
    try:
        denied = privileges.unreadable(identity, directories)
        if not denied:
            privileges.drop(identity)
    except (OSError, privileges.PrivilegeError) as exc:
        # Root without the right to switch ids (a confined container): watching as
        # root beats a watcher that dies at every start.
        log.warning("the watcher stays root: cannot switch to %s: %s", identity.name, exc)
        return
    if denied:
        log.warning("the watcher stays root: %s cannot read %s (changes there would go unnoticed); "
                    "make them readable to it to run the watcher unprivileged",
                    identity.name, ", ".join(denied))
        return
    log.info("the watcher runs as %s (%s)", identity.name, why)


def _existing_directory(path: str) -> str:
    """`path`, or its nearest ancestor that is a directory (what `_Directories` watches
    for a root that does not exist yet)."""
    while _identity(path) is None and path != "/":
        path = os.path.dirname(path)
    return path


def run_watcher(watch: Watch, report: Callable[[list[str]], None], stop_fd: int | None = None,
                quiet_s: float = 0.2, *, on_ready: Callable[[], None] | None = None,
                clock: Callable[[], float] = time.monotonic) -> None:
    """Watch until `stop_fd` is readable (or at EOF); call `report(sorted topics)` once
    per debounced burst of changes, from the calling thread.

    `on_ready` is called once the directories are watched: a change made after it is
    seen. Nothing is global, so several watchers can run in one process; an exception
    from `report` stops the watcher and propagates.
    """
    from watchdog.observers import Observer

    loop = Loop(clock)
    events: queue.SimpleQueue = queue.SimpleQueue()
    debouncer = Debouncer(quiet_s)
    report_timer: Timer | None = None

    def on_events() -> None:
        nonlocal report_timer
        changed = _event_paths(events)
        # A directory may have appeared, gone or been replaced: the files found in a
        # directory watched anew count as changed (they may predate its watch).
        changed += _files_under(directories.sync())
        noted = False
        for path in changed:
            if matches(watch, path):
                debouncer.note(path, loop.now)
                noted = True
        if noted:
            if report_timer is not None:
                report_timer.cancel()
            report_timer = loop.call_at(debouncer.deadline(), report_burst)

    def report_burst() -> None:
        nonlocal report_timer
        report_timer = None
        topics = sorted({topic for path in debouncer.take() for topic in matches(watch, path)})
        if topics:
            report(topics)

    observer = Observer()
    observer.daemon = True
    directories = _Directories(observer, _Funnel(events, loop.threadsafe_waker(on_events)), watch.roots())
    if stop_fd is not None:
        loop.register(stop_fd, loop.stop)
    try:
        observer.start()
        directories.sync()
        if on_ready is not None:
            on_ready()
        loop.run()
    finally:
        observer.stop()  # also stops watchdog's inotify reader, started with the Observer
        if observer.ident is not None:
            observer.join(timeout=10)
        # A late event from a thread that outlived the join finds the waker's socket
        # closed and is dropped: it can never write into a reused fd number.
        loop.close()


class _Funnel:
    """The observer's event handler: runs in watchdog's thread, so it only queues and
    wakes the loop."""

    def __init__(self, events: queue.SimpleQueue, wake: Callable[[], None]):
        self.events = events
        self.wake = wake

    def dispatch(self, event) -> None:
        self.events.put(event)
        self.wake()


def _event_types():
    from watchdog import events as ev
    # Changes only: opening, reading and closing unwritten files are not changes, and a
    # directory's own mtime/attribute events are noise beside its entries' events.
    return [ev.FileCreatedEvent, ev.FileModifiedEvent, ev.FileAttribEvent, ev.FileDeletedEvent,
            ev.FileMovedEvent, ev.FileClosedEvent, ev.DirCreatedEvent, ev.DirDeletedEvent, ev.DirMovedEvent]


class _Directories:
    """The directories scheduled on the observer, kept in line with the wanted roots.

    A root that does not exist is replaced by its nearest existing ancestor, watched
    flat, so its creation wakes us; a root replaced by another directory (a new inode)
    is watched anew, since a watch follows the inode, not the name.
    """

    def __init__(self, observer, handler: _Funnel, roots: list[tuple[str, bool]]):
        self.observer = observer
        self.handler = handler
        self.roots = roots
        self.event_filter = _event_types()
        self.scheduled: dict[tuple[str, bool], tuple[object, tuple[int, int]]] = {}
        self.started = False

    def sync(self) -> list[tuple[str, bool]]:
        """Schedule and unschedule to match the disk; return the wanted roots watched
        anew ([] on the first call: what exists at start is not a change)."""
        fresh = []
        for _ in range(3):  # a directory may vanish between stat and schedule: look again
            wanted = self._wanted()
            for key in [key for key in self.scheduled if self.scheduled[key][1] != wanted.get(key)]:
                self.observer.unschedule(self.scheduled.pop(key)[0])
            try:
                for key, identity in wanted.items():
                    if key not in self.scheduled:
                        watch = self.observer.schedule(self.handler, key[0], recursive=key[1],
                                                       event_filter=self.event_filter)
                        self.scheduled[key] = (watch, identity)
                        fresh.append(key)
            except (FileNotFoundError, NotADirectoryError):
                continue
            break
        first, self.started = not self.started, True
        return [] if first else [key for key in fresh if key in self.roots]

    def _wanted(self) -> dict[tuple[str, bool], tuple[int, int]]:
        keys = {}
        for path, deep in self.roots:
            while _identity(path) is None and path != "/":
                path, deep = os.path.dirname(path), False
            keys[path, deep] = None
        wanted = {}
        for key in minimal_roots(keys):
            identity = _identity(key[0])
            if identity is not None:
                wanted[key] = identity
        return wanted


def _identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of a directory, or None if `path` is not one."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISDIR(info.st_mode) else None


def _event_paths(events: queue.SimpleQueue) -> list[str]:
    paths = []
    while True:
        try:
            event = events.get_nowait()
        except queue.Empty:
            return paths
        paths.append(os.fsdecode(event.src_path))
        if event.dest_path:  # a move: where it went matters most
            paths.append(os.fsdecode(event.dest_path))


def _files_under(roots: list[tuple[str, bool]]) -> list[str]:
    paths = []
    for root, deep in roots:
        for directory, subdirectories, files in os.walk(root):
            paths += [os.path.join(directory, name) for name in files]
            if not deep:
                subdirectories.clear()
    return paths
