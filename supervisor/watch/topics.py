"""What the watcher watches and when it reports (pure): globs, topics, debouncing.

A report is a sorted list of *topics*: "config" (the config file, a file it includes,
or a new file an include glob matches) and "app:NAME" (a file an app's `reload_on`
globs match, or its TLS certificate, key or client CAs: a rotation). One save is one report: an editor's burst of events (write, close,
rename, chmod) is debounced until the paths have been quiet for `quiet_s`.

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
import re
from dataclasses import dataclass, field
from typing import Iterable

from supervisor.config.model import Config
from supervisor.config.tls import tls_files

CONFIG = "config"
APP_PREFIX = "app:"
_MAGIC = re.compile(r"[*?[]")
_ANY_NAME = r"(?!\.)[^/]+"   # one path component that is not hidden


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
                 app_globs={name: app.reload_on + tuple(glob.escape(path) for path in tls_files(app))
                            for name, app in config.apps.items() if app.reload_on or tls_files(app)})


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
