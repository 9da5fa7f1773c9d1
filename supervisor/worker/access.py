"""What an app's user must be able to read for its workers to start, and who cannot.

A root master runs an app that names no user as nobody, and nobody cannot read a
project under /root: without this module, every such failure is a bare traceback
naming whatever the import tripped on (`PermissionError`, `No module named
'contextvars'` from a Python installed in root's home, ...). Here each path a worker
needs is judged as the user it runs as, by the kernel itself (`os.access` after the
privilege drop, never by reading mode bits), and each one it cannot read is explained:
the directory that stops it, the config key to change, the chmod that would do.

One list of needs, three callers:

- the forked child, after the drop and before the exec, checks `startup_needs` (the
  interpreter and what Baton's bootstrap imports), so a venv the user cannot read is
  a clear BOOT_FAILED rather than a "Fatal Python error" from the new interpreter;
- the worker, when its boot failed, checks `app_needs` as well (chdir, pythonpath,
  the module's files, found without importing anything) and adds the explanation to
  the traceback;
- `baton check` runs `check_config`: one child per app that drops to the app's user
  and checks both lists.

Nothing here imports app code: module files are found with `PathFinder`, which only
lists directories and stats files.
"""
from __future__ import annotations

import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from importlib.machinery import PathFinder

from supervisor.config import modulespec
from supervisor.config.model import DEFAULT_USER, Config, ConfigError, effective_user
from supervisor.system import privileges, spawn

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

# The third-party packages the worker's bootstrap imports before any app code.
BOOTSTRAP_PACKAGES = ("supervisor", "setproctitle", "httptools")


@dataclass(frozen=True)
class Need:
    """A path a worker must reach with `mode` (os.R_OK, os.X_OK), and the app key
    whose value brought it in ("user" when no key but the user can change it)."""
    path: str
    what: str
    key: str
    mode: int


@dataclass(frozen=True)
class Denied:
    """A `Need` the user cannot meet: `blocked` is the first directory on the way it
    cannot enter (None when it reaches the path but cannot read it), on the way to
    `target`: the path itself, or where its symlinks lead when they are what is
    blocked (a venv whose python links into /root/.pyenv)."""
    need: Need
    blocked: str | None
    target: str | None = None   # None: need.path

    @property
    def route(self) -> str:
        return self.target or self.need.path


@dataclass(frozen=True)
class Who:
    """Who a worker runs as, as the messages name it."""
    name: str
    uid: int
    user_set: bool      # the app names its user (else: the default of a root master)


# -- what a worker needs -----------------------------------------------------------

def startup_needs(search_path: list[str]) -> list[Need]:
    """What the new interpreter needs before any app code runs: itself, its venv's
    pyvenv.cfg, the standard library, and the sys.path entries (of `search_path`,
    the master's) that hold the packages the bootstrap imports."""
    needs = [Need(sys.executable, "the Python interpreter", "user", os.X_OK)]
    config = os.path.join(sys.prefix, "pyvenv.cfg")
    if sys.prefix != sys.base_prefix:
        needs.append(Need(config, "the virtualenv's pyvenv.cfg", "user", os.R_OK))
    # Where this interpreter found its standard library (a venv's sysconfig paths
    # point into the venv, which holds none of it), and its extension modules.
    for directory in (os.path.dirname(os.__file__), sysconfig.get_config_var("DESTSHARED")):
        if directory:
            needs.append(Need(directory, "the standard library", "user", os.R_OK | os.X_OK))
    for package in BOOTSTRAP_PACKAGES:
        spec = PathFinder.find_spec(package, search_path)
        if spec is None or not spec.origin:
            continue
        entry = _path_entry(spec)
        needs.append(Need(entry, f"the directory Baton imports {package} from", "user", os.R_OK | os.X_OK))
    return _unique(needs)


def app_needs(app, search_path: list[str]) -> list[Need]:
    """What importing `app`'s module needs beyond `startup_needs`: its chdir, its
    pythonpath entries, and the files and package directories of its module and of
    each hook's module (named by their keys), as found on the worker's sys.path
    (`app_search_path`) by `PathFinder` alone."""
    needs = []
    if app.chdir:
        needs.append(Need(app.chdir, "the app's chdir", "chdir", os.R_OK | os.X_OK))
    for entry in app.pythonpath:
        needs.append(Need(entry, "a pythonpath entry", "pythonpath", os.R_OK | os.X_OK))
    where = app_search_path(app, search_path)
    modules = [("module", app.module)]
    modules.extend((key, getattr(app, key, None)) for key in (*modulespec.HOOKS, "preload_hook"))
    for key, text in modules:
        if text:
            try:
                dotted = modulespec.parse(text).module
            except ValueError:
                continue
            needs.extend(_module_needs(dotted, where, key))
    return _unique(needs)


def _module_needs(dotted: str, where: list[str], key: str) -> list[Need]:
    """The files and package directories importing `dotted` reads, blamed on `key`."""
    needs = []
    name = ""
    for part in dotted.split("."):
        name = f"{name}.{part}" if name else part
        try:
            spec = PathFinder.find_spec(name, where)
        except (ImportError, OSError, ValueError):
            spec = None
        if spec is None:
            break   # not found is not a permission matter (or an entry above says why)
        if spec.origin and os.path.isabs(spec.origin):
            needs.append(Need(spec.origin, f"the file of module {name}", key, os.R_OK))
        locations = list(spec.submodule_search_locations or ())
        needs.extend(Need(location, f"the directory of package {name}", key, os.R_OK | os.X_OK)
                     for location in locations)
        if not locations:
            break
        where = locations
    return needs


def app_search_path(app, search_path: list[str]) -> list[str]:
    """The sys.path a worker of `app` imports with: chdir first, then pythonpath,
    then `search_path` (the master's), as `worker.process` builds it."""
    where = [*app.pythonpath, *search_path]
    if app.chdir and app.chdir not in where:
        where.insert(0, app.chdir)
    return where


def _path_entry(spec) -> str:
    """The sys.path entry a top-level module was found in."""
    if spec.submodule_search_locations:
        return os.path.dirname(os.path.dirname(spec.origin))
    return os.path.dirname(spec.origin)


def _unique(needs: list[Need]) -> list[Need]:
    seen, out = set(), []
    for need in needs:
        if need.path not in seen:
            seen.add(need.path)
            out.append(need)
    return out


# -- judged as the current user ------------------------------------------------------

def denied(needs: list[Need]) -> list[Denied]:
    """Those of `needs` this process cannot meet. A path that does not exist is not
    judged (that is not a permission matter); one it cannot even stat is. Of several
    stopped at the same directory only the first is kept: one fix opens them all."""
    out = []
    stops = set()
    for need in needs:
        try:
            os.stat(need.path)
        except PermissionError:
            out.append(Denied(need, *_first_blocked(need.path)))
            continue
        except (OSError, ValueError):
            continue
        if not os.access(need.path, need.mode):
            out.append(Denied(need, *_first_blocked(need.path)))
    kept = []
    for item in out:
        if item.blocked is None or item.blocked not in stops:
            kept.append(item)
            stops.add(item.blocked)
    return kept


def _first_blocked(path: str) -> tuple[str | None, str | None]:
    """The first directory on the way to `path` (as written, then as resolved) that
    this process cannot enter, or None; and the path a chmod should name when it is
    not `path` as written (its symlinks resolved), else None."""
    written, resolved = os.path.abspath(path), os.path.realpath(path)
    for route in (written, resolved):
        current = os.sep
        for part in route.split(os.sep)[1:-1]:
            current = os.path.join(current, part)
            if not os.access(current, os.X_OK):
                return current, (None if route == written else route)
    return None, (resolved if resolved != written else None)


def denied_path(path: str) -> Denied | None:
    """A path an error named (a `PermissionError`'s filename) as a Denied, when this
    process indeed cannot reach or read it."""
    found = denied([Need(path, "a path the app opened", "user", os.R_OK)])
    return found[0] if found else None


# -- words --------------------------------------------------------------------------

def fix(item: Denied) -> str:
    """A chmod that would let others (the user) through, e.g.
    `chmod o+x /root && chmod o+rx /root/project`."""
    need = item.need
    own = "o+rx" if need.mode & os.R_OK and need.mode & os.X_OK else "o+x" if need.mode & os.X_OK else "o+r"
    route = os.path.abspath(item.route)
    if item.blocked is None:
        return f"chmod {own} {route}"
    below = []
    current = item.blocked
    while route.startswith(current + os.sep):
        below.append(current)
        current = os.path.join(current, route[len(current) + 1:].split(os.sep, 1)[0])
    if not below:   # not on the way after all: open just that directory
        return f"chmod o+x {item.blocked}"
    return f"chmod o+x {' '.join(below)} && chmod {own} {route}"


def _reads(need: Need) -> str:
    return "cannot run" if need.mode == os.X_OK else "cannot read"


def who_text(who: Who) -> str:
    return f"{who.name} (uid {who.uid})"


def explain(item: Denied, who: Who, app_name: str, source: str | None) -> str:
    """One line for the worker's boot failure, e.g. "worker runs as nobody (uid
    65534), which cannot read /root/project (the app's chdir; it cannot enter /root):
    set `user = ...` in [apps.blog] of /etc/baton/baton.toml (...), or make the path
    readable (chmod o+x /root && chmod o+rx /root/project)"."""
    need = item.need
    where = f"[apps.{app_name}] of {source}" if source else f"[apps.{app_name}]"
    stop = f"; it cannot enter {item.blocked}" if item.blocked else ""
    default = "" if who.user_set else f" (it names no user: a root master runs it as {who.name})"
    return (f"worker runs as {who_text(who)}, which {_reads(need)} {need.path} ({need.what}{stop}): "
            f"set `user = ...` in {where}{default}, or make the path readable ({fix(item)})")


def problem(item: Denied, who: Who, app_name: str, source: str) -> str:
    """One `baton check` line: the file, the key that brought the path in, what the
    user cannot do, and both ways out."""
    need = item.need
    stop = f": it cannot enter {item.blocked}" if item.blocked else ""
    default = "" if who.user_set else f"; the app names no user, so as root its workers run as {who.name}"
    return (f"{source}: apps.{app_name}.{need.key}: {who_text(who)} {_reads(need)} {need.path}, "
            f"{need.what}{stop}{default}: set apps.{app_name}.user to a user that can, or {fix(item)}")


def worker_who(spec) -> Who:
    """Who a worker of `spec` runs as. In the worker the master's uid is gone, so an
    app with no user running as the default user is taken to be a root master's."""
    identity = spec.identity
    return Who(identity.name, identity.uid, spec.app.user is not None or identity.name != DEFAULT_USER)


def explain_for(spec, item: Denied) -> str:
    return explain(item, worker_who(spec), spec.app.name, spec.config_source)


def boot_hint(spec, exc: BaseException, *, startup_only: bool = False) -> str:
    """Lines to add to the traceback of a boot that raised `exc` (empty when no
    permission is to blame): every path the worker needs and cannot read, judged now,
    as the app's user, and the path a `PermissionError` on the way named. Only what
    the interpreter's start needs with `startup_only` (before the exec: the app's
    paths are the new interpreter's to set up). Never raises: it runs on the way to
    BOOT_FAILED, which must still be sent."""
    try:
        return _boot_hint(spec, exc, startup_only)
    except Exception as error:   # noqa: BLE001 - the traceback must still reach the master
        return f"(could not check what the worker may read: {error!r})\n"


def _boot_hint(spec, exc: BaseException, startup_only: bool) -> str:
    needs = startup_needs(sys.path)
    if not startup_only:
        needs += app_needs(spec.app, sys.path)
    items = denied(_unique(needs))
    lines = [explain_for(spec, item) for item in items]
    named = {item.need.path for item in items}
    who = worker_who(spec)
    for error in _chain(exc):
        if isinstance(error, PermissionError) and error.filename and error.filename not in named:
            named.add(error.filename)
            item = denied_path(os.fsdecode(error.filename))
            lines.append(explain_for(spec, item) if item is not None else
                         f"worker runs as {who_text(who)}, which may not open {error.filename} that way "
                         f"({error.strerror}): set `user = ...` in {_where(spec)}, or give it the access")
        elif type(error).__name__ == "OperationalError" and "readonly database" in str(error):
            lines.append(f"worker runs as {who_text(who)}, which cannot write the database: set `user = ...` "
                         f"in {_where(spec)}, or make the database file and its directory writable by it")
    return "".join(f"{line}\n" for line in lines)


def _where(spec) -> str:
    source = spec.config_source
    return f"[apps.{spec.app.name}] of {source}" if source else f"[apps.{spec.app.name}]"


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def user_line(app, user: str, running_as_root: bool) -> str:
    """The master's log line saying who `app`'s workers run as, and why."""
    if not running_as_root:
        return f"app {app.name!r} runs as {user} (the master's user: only root can switch)"
    if app.user is None:
        return (f"app {app.name!r} names no user; its workers run as {user} "
                f"(the master is root; set user = ... in [apps.{app.name}])")
    return f"app {app.name!r} runs as {user} (its user)"


def app_source(config: Config, app_name: str) -> str | None:
    """The file whose [apps.NAME] table defines the app: the main file unless an
    included one does (read again here; None when that fails or there is no file)."""
    sources = list(config.sources or ([config.path] if config.path else []))
    for path in sources[1:]:
        try:
            with open(path, "rb") as f:
                if app_name in tomllib.load(f).get("apps", {}):
                    return path
        except (OSError, ValueError, AttributeError):
            continue
    return config.path


# -- baton check ---------------------------------------------------------------------

def check_config(config: Config) -> list[str]:
    """Every path some app's user could not read, as `baton check` lines: per app, a
    child drops to the app's user and judges `startup_needs` and `app_needs`.
    Without root the user is the master's own, judged the same way."""
    running_as_root = os.geteuid() == 0
    lines = []
    for name, app in config.apps.items():
        try:
            identity = privileges.resolve(effective_user(app, running_as_root), app.group)
        except privileges.PrivilegeError:
            continue   # the reader reported the unknown user already
        who = Who(identity.name, identity.uid, app.user is not None or not running_as_root)
        source = app_source(config, name) or "<command line>"
        for item in _denied_as(identity, app):
            lines.append(problem(item, who, name, source))
    return lines


def require_readable(config: Config) -> None:
    """Raise ConfigError with `check_config`'s lines, if there are any."""
    lines = check_config(config)
    if lines:
        raise ConfigError(lines)


def _denied_as(identity: privileges.Identity, app) -> list[Denied]:
    """`denied` of both lists, judged in a child running as `identity`."""
    read_end, write_end = os.pipe()
    try:
        def child() -> int:
            privileges.drop(identity)
            needs = startup_needs(sys.path) + app_needs(app, sys.path)
            payload = json.dumps([[d.need.path, d.need.what, d.need.key, d.need.mode, d.blocked, d.target]
                                  for d in denied(needs)]).encode()
            with open(write_end, "wb") as out:
                out.write(payload)
            return 0
        pid = spawn.fork(child, [write_end])
    finally:
        os.close(write_end)
    with open(read_end, "rb") as f:
        data = f.read()
    status = spawn.reap(pid, block=True)
    if status is None or os.waitstatus_to_exitcode(status) != 0 or not data:
        raise privileges.PrivilegeError(f"could not check as {identity.name} what app {app.name} needs to read")
    return [Denied(Need(path, what, key, mode), blocked, target)
            for path, what, key, mode, blocked, target in json.loads(data)]
