"""The file watcher: tell the master when the config or an app's code changed on disk.

The master is single-threaded (it forks) and watchdog's observer uses threads, so the
watcher runs in its own small child process (`main`), which reports over its channel
to the master. Its promises:

- It watches *directories*, never files: an editor that saves by writing a temp file
  and renaming it over the target replaces the inode, and a watch on the file itself
  would go deaf after the first save. Events are filtered by path.
- One save is one report: an editor's burst of events (write, close, rename, chmod)
  is debounced until the paths have been quiet for `quiet_s`.
- A report is a sorted list of *topics*: "config" (the config file, a file it includes,
  or a new file an include glob matches) and "app:NAME" (a file an app's `reload_on`
  globs match).
- A watched directory that does not exist yet (an empty `apps.d/`), or is deleted and
  created again (a checkout), is picked up when it appears; the matching files found
  in it then count as changed.
- Opening or reading a file is not a change (the master reading its config, a worker
  importing its code), so a reload never triggers itself.

Glob semantics are glob.glob(recursive=True)'s, which `config.load` uses to expand
`include`: `*`, `?` and `[...]` never cross a `/`, `**` as a whole component matches any
number of directories (zero included), and wildcards never match a name that starts
with "." (editor lock and swap files, `.git`, `.venv`) unless the pattern's component
does. We translate globs ourselves on every Python: `PurePath.full_match` (3.13) would
match hidden names, so the watcher and the loader would disagree on what is included.
"""
from __future__ import annotations

import glob
import os
import queue
import re
import selectors
import socket
import stat
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

from supervisor.config.model import Config

CONFIG = "config"
APP_PREFIX = "app:"
_MAGIC = re.compile(r"[*?[]")
_ANY_NAME = r"(?!\.)[^/]+"   # one path component that is not hidden
WATCHDOG_DOUBLE_ADD = "Callback with id"  # a harmless watchdog warning; see `main`


# -- debouncing (pure) ----------------------------------------------------------


class Debouncer:
    """Collects changed paths until none has been noted for `quiet_s` seconds.

    Time is passed in (`now`), so tests drive it with a fake clock. Contract:
    `note` paths as they come; when `due(now)`, `take()` returns the paths noted since
    the last take, deduplicated and sorted, and starts over. `deadline()` is when the
    current burst becomes due if nothing more arrives (None when nothing is pending):
    the caller's wait timeout.
    """

    def __init__(self, quiet_s: float):
        self.quiet_s = quiet_s
        self._paths: dict[str, None] = {}
        self._last: float | None = None

    def note(self, path: str, now: float) -> None:
        self._paths[path] = None
        self._last = now

    def deadline(self) -> float | None:
        return None if self._last is None else self._last + self.quiet_s

    def due(self, now: float) -> bool:
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    def take(self) -> list[str]:
        paths = sorted(self._paths)
        self._paths.clear()
        self._last = None
        return paths


# -- globs (pure) -----------------------------------------------------------------


def translate(pattern: str) -> str:
    """The regular expression (for `re.fullmatch`) of an absolute glob; see the module
    docstring for the semantics. Relative patterns are refused: anchor them first."""
    if not pattern.startswith("/"):
        raise ValueError(f"expected an absolute glob, found {pattern!r}")
    parts = os.path.normpath(pattern).split("/")
    regex = ""  # parts[0] is the empty name before the leading "/"
    for part in parts[1:]:
        if part == "**":
            regex += rf"(?:/{_ANY_NAME})*"
        elif part:
            regex += "/" + _component(part)
    return regex or "/"


def compile_glob(pattern: str) -> re.Pattern:
    return re.compile(translate(pattern))


def has_magic(pattern: str) -> bool:
    return _MAGIC.search(pattern) is not None


def _component(part: str) -> str:
    """One path component of a glob; a wildcard never matches a leading "."."""
    if not has_magic(part):
        return re.escape(part)
    regex = "" if part.startswith(".") else r"(?!\.)"
    index = 0
    while index < len(part):
        char = part[index]
        index += 1
        if char == "*":
            if not regex.endswith("[^/]*"):
                regex += "[^/]*"
        elif char == "?":
            regex += "[^/]"
        elif char == "[" and (end := _class_end(part, index)) is not None:
            regex += _char_class(part[index:end])
            index = end + 1
        else:
            regex += re.escape(char)
    return regex


def _class_end(part: str, start: int) -> int | None:
    """Index of the "]" closing a class opened just before `start` (fnmatch's rules:
    a "]" right after "[" or "[!" is a member), or None: then "[" is literal."""
    index = start
    if index < len(part) and part[index] == "!":
        index += 1
    if index < len(part) and part[index] == "]":
        index += 1
    end = part.find("]", index)
    return None if end < 0 else end


def _char_class(members: str) -> str:
    negate = members.startswith("!")
    if negate:
        members = members[1:]
    items, index = [], 0
    while index < len(members):
        if index + 2 < len(members) and members[index + 1] == "-":
            low, high = members[index], members[index + 2]
            if low <= high:  # fnmatch drops reversed ranges
                items.append(f"{re.escape(low)}-{re.escape(high)}")
            index += 3
        else:
            items.append(re.escape(members[index]))
            index += 1
    if not items:
        return "[^/]" if negate else "(?!)"
    body = "".join(items)
    return f"[^/{body}]" if negate else f"(?!/)[{body}]"


# -- what to watch (pure) ---------------------------------------------------------


@dataclass(frozen=True)
class Watch:
    """What to watch, all absolute: `files` (the config file and the files it included)
    and `config_globs` (the include globs) make topic "config"; `app_globs` maps an app
    name to its `reload_on` globs, topic "app:NAME". Equal watches watch the same."""
    files: tuple[str, ...] = ()
    config_globs: tuple[str, ...] = ()
    app_globs: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (name, globs); a Mapping is accepted
    _rules: tuple[tuple[str, re.Pattern], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Tuples only, so a Watch is hashable and compares by value.
        apps = tuple((name, tuple(globs)) for name, globs in dict(self.app_globs).items())
        object.__setattr__(self, "files", tuple(os.path.normpath(path) for path in self.files))
        object.__setattr__(self, "config_globs", tuple(self.config_globs))
        object.__setattr__(self, "app_globs", apps)
        rules = [(CONFIG, compile_glob(glob.escape(path))) for path in self.files]
        rules += [(CONFIG, compile_glob(pattern)) for pattern in self.config_globs]
        rules += [(APP_PREFIX + name, compile_glob(pattern)) for name, globs in apps for pattern in globs]
        object.__setattr__(self, "_rules", tuple(rules))

    def patterns(self) -> list[str]:
        return [glob.escape(path) for path in self.files] + list(self.config_globs) + [
            pattern for _, globs in self.app_globs for pattern in globs]

    def roots(self) -> list[tuple[str, bool]]:
        """The directories to watch, each with whether recursively: sorted, and without
        one that a recursive one already covers."""
        return minimal_roots(root_of(pattern) for pattern in self.patterns())


def watch_for(config: Config) -> Watch:
    """What a master running `config` must watch. A config file that is a symlink to
    another directory is watched at both ends: editing the target changes what we read.
    (Not when only a directory is a symlink: both names are one inode, one watch.)"""
    files = list(config.sources or ([config.path] if config.path else []))
    files += [os.path.realpath(path) for path in files
              if os.path.dirname(os.path.realpath(path)) != os.path.realpath(os.path.dirname(path))]
    return Watch(files=tuple(dict.fromkeys(files)), config_globs=config.master.include,
                 app_globs={name: app.reload_on for name, app in config.apps.items() if app.reload_on})


def matches(watch: Watch, path: str | bytes) -> list[str]:
    """The topics an absolute path belongs to, sorted ([] for none)."""
    path = os.path.normpath(os.fsdecode(path))
    return sorted({topic for topic, regex in watch._rules if regex.fullmatch(path)})


def root_of(pattern: str) -> tuple[str, bool]:
    """The directory whose events can concern an absolute glob, and whether its
    subdirectories matter too: the glob's literal leading directories."""
    parts = os.path.normpath(pattern).split("/")
    first_magic = next((i for i, part in enumerate(parts) if has_magic(part)), None)
    if first_magic is None:  # a plain path: its directory
        return os.path.dirname(os.path.normpath(pattern)) or "/", False
    root = "/".join(parts[:first_magic]) or "/"
    return root, len(parts) - first_magic > 1 or parts[first_magic] == "**"


def minimal_roots(roots: Iterable[tuple[str, bool]]) -> list[tuple[str, bool]]:
    roots = set(roots)
    recursive = {path for path, deep in roots if deep}

    def covered(path: str, deep: bool) -> bool:
        return any((path == other and not deep) or _inside(path, other) for other in recursive)
    return sorted((path, deep) for path, deep in roots if not covered(path, deep))


def _inside(path: str, directory: str) -> bool:
    """Whether `path` is strictly below `directory`."""
    return path != directory and path.startswith(directory.rstrip("/") + "/")


# -- the watcher loop -------------------------------------------------------------


def main(watch: Watch, end: socket.socket) -> int:
    """The watcher child: send each report to the master as a CHANGED message; return
    when the master's end closes (the master never writes to this channel)."""
    import setproctitle

    from supervisor.ipc import channel
    from supervisor.ipc.messages import CHANGED, READY, Message

    setproctitle.setproctitle("baton: watcher")
    # watchdog 7 warns from its inotify thread when a new directory tree is added to a
    # recursive watch twice (a benign race); under -W error that warning would kill the
    # thread and leave the watcher deaf. This process is ours alone, so filter globally.
    warnings.filterwarnings("ignore", message=WATCHDOG_DOUBLE_ADD, category=RuntimeWarning)
    end.setblocking(True)
    run_watcher(watch, lambda topics: channel.send(end, Message(CHANGED, {"topics": topics})),
                stop_fd=end.fileno(), on_ready=lambda: channel.send(end, Message(READY)))
    return 0


def run_watcher(watch: Watch, report: Callable[[list[str]], None], stop_fd: int | None = None,
                quiet_s: float = 0.2, *, on_ready: Callable[[], None] | None = None) -> None:
    """Watch until `stop_fd` is readable (or at EOF); call `report(sorted topics)` once
    per debounced burst of changes, from the calling thread.

    watchdog's threads (all daemonic) only queue events and wake this thread through a
    pipe; everything else happens here, in one selector wait whose timeout is the
    debouncer's deadline. `on_ready` is called once the directories are watched: a
    change made after it is seen. Nothing is global, so several watchers can run in one
    process; an exception from `report` stops the watcher and propagates.
    """
    from watchdog.observers import Observer

    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    events: queue.SimpleQueue = queue.SimpleQueue()
    observer = Observer()
    observer.daemon = True
    directories = _Directories(observer, _Funnel(events, wake_write), watch.roots())
    debouncer = Debouncer(quiet_s)
    selector = selectors.DefaultSelector()
    try:
        selector.register(wake_read, selectors.EVENT_READ)
        if stop_fd is not None:
            selector.register(stop_fd, selectors.EVENT_READ)
        observer.start()
        directories.sync()
        if on_ready is not None:
            on_ready()
        while True:
            deadline = debouncer.deadline()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = selector.select(timeout)
            if any(key.fd == stop_fd for key, _ in ready):
                return
            _drain(wake_read)
            now = time.monotonic()
            changed = _event_paths(events)
            # A directory may have appeared, gone or been replaced: the files found in a
            # directory watched anew count as changed (they may predate its watch).
            changed += _files_under(directories.sync())
            for path in changed:
                if matches(watch, path):
                    debouncer.note(path, now)
            if debouncer.due(time.monotonic()):
                topics = sorted({topic for path in debouncer.take() for topic in matches(watch, path)})
                if topics:
                    report(topics)
    finally:
        selector.close()
        observer.stop()  # also stops watchdog's inotify reader, started with the Observer
        if observer.ident is not None:
            observer.join(timeout=10)
        os.close(wake_read)
        if not observer.is_alive():  # else a late event could write into a reused fd
            os.close(wake_write)


class _Funnel:
    """The observer's event handler: runs in watchdog's thread, so it only queues."""

    def __init__(self, events: queue.SimpleQueue, wake_fd: int):
        self.events = events
        self.wake_fd = wake_fd

    def dispatch(self, event) -> None:
        self.events.put(event)
        try:
            os.write(self.wake_fd, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the main thread is awake anyway


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


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
