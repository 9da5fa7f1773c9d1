"""Logging setup for the master, its helper processes and its workers.

The master and its own helpers (balancer, watcher) write to the log files' fds, which
the helpers inherit. Workers run app code, so they hold no log file at all: they write
to pipes the master reads (`supervisor.master.logsink`), which tags each line with the
worker's app and pid before writing it; `worker_logs` sets a worker's loggers up over
those pipes. A helper cannot reopen a rotated log itself (it runs as another user);
instead (SIGUSR1, for logrotate):

1. the master calls `Logs.reopen()`: each log *file* (never stdout/stderr) is opened
   anew and `dup2`ed onto the fd number it had, so the master's handlers, faulthandler
   and the log sink write to the new file with no change of fd number; the new fds are
   returned as `(fd_number, new_fd)` pairs;
2. the master sends the new fds to the balancer over its channel, then calls
   `Logs.release(pairs)` to close its copies;
3. the balancer calls `Logs.adopt(numbers, fds)`: the same `dup2` onto the same numbers.

Log fds therefore keep the numbers they had at `setup()` in every process, for ever:
`Logs.fds` stays right for children spawned later and for any number of reopens.

Lines are text or, with `log_format="json"`, one JSON object per line. Nothing is
formatted for a disabled logger: access lines are logged as `AccessRecord` objects and
turned into text by the handler's formatter, after the level check.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from supervisor.http.accesslog import (
    DEFAULT_FORMAT,
    DEFAULT_JSON_FORMAT,
    AccessRecord,
    compile_format,
    iso_time,
)

ERROR_LOGGER = "baton.error"
ACCESS_LOGGER = "baton.access"
LOG_FORMATS = ("text", "json")
# How every log file is opened, at setup and at each reopen.
_FILE_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
FILE_MODE = 0o640

_json_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class _TextFormatter(logging.Formatter):
    converter = time.gmtime

    def __init__(self):
        super().__init__("[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S +0000")


class _JsonFormatter(logging.Formatter):
    """{"time", "level", "pid", "message", "logger"}, plus "exc" (and "stack") when given."""

    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "time": iso_time(record.created),
            "level": record.levelname.lower(),
            "pid": record.process,
            "message": record.getMessage(),
            "logger": record.name,
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            obj["exc"] = record.exc_text
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        return _json_encode(obj)


class _AccessFormatter(logging.Formatter):
    """Formats an `AccessRecord` message with the compiled access format; anything else
    logged to the access logger falls back to `fallback`."""

    def __init__(self, line, fallback: logging.Formatter):
        super().__init__()
        self._line = line
        self._fallback = fallback

    def format(self, record: logging.LogRecord) -> str:
        message = record.msg
        if message.__class__ is AccessRecord:
            return self._line(message)
        return self._fallback.format(record)


class _FileHandler(logging.StreamHandler):
    """A handler owning a stream over one of our log fds; closing it closes the fd."""

    def close(self) -> None:
        self.acquire()
        try:
            stream = self.stream
            if stream is not None:
                self.stream = None
                try:
                    stream.flush()
                finally:
                    stream.close()
        finally:
            self.release()
            super().close()


@dataclass
class Logs:
    """The error and access loggers and the fds they write to.

    `fds` lists every log fd (error first) that a child must keep open; `paths` maps
    the fds that are files (not stdio) to their paths, for `reopen()`. `access_line` is
    the compiled access format (None without an access log): its `needs_environ` and
    `needs_response_headers` tell the server what to put in each `AccessRecord`.
    """
    error: logging.Logger
    access: logging.Logger | None
    fds: tuple[int, ...]
    paths: Mapping[int, str] = field(default_factory=lambda: MappingProxyType({}))
    access_line: Callable[[AccessRecord], str] | None = None
    log_format: str = "text"
    access_log_format: str | None = None   # as configured; None: the default for log_format

    @property
    def access_fd(self) -> int | None:
        return self.fds[1] if self.access is not None else None

    def reopen(self) -> list[tuple[int, int]]:
        """Master side of a logrotate reopen: open each log file's path anew and make
        its fd number point there. Returns `(fd_number, new_fd)` pairs: send each
        `new_fd` to the children (they `adopt` it onto `fd_number`), then `release`.

        A path that cannot be opened is logged and skipped: that log keeps going to
        the old file. Never raises OSError.
        """
        pairs = []
        self._flush()
        for number, path in self.paths.items():
            try:
                new_fd = os.open(path, _FILE_FLAGS, FILE_MODE)
            except OSError as exc:
                self.error.error("cannot reopen log file %s: %s; still writing to the old one", path,
                                 exc.strerror or exc)
                continue
            try:
                os.dup2(new_fd, number, inheritable=os.get_inheritable(number))
            except OSError as exc:
                os.close(new_fd)
                self.error.error("cannot reopen log file %s: %s", path, exc.strerror or exc)
                continue
            pairs.append((number, new_fd))
        return pairs

    @staticmethod
    def release(pairs: list[tuple[int, int]]) -> None:
        """Close the master's copies of the fds `reopen()` returned, once they were
        sent to every child (or sending failed: call it in a `finally`)."""
        for _, new_fd in pairs:
            try:
                os.close(new_fd)
            except OSError:
                pass

    def adopt(self, numbers: list[int], fds: list[int]) -> None:
        """Child side of a reopen: point each log fd `numbers[i]` at the received
        `fds[i]` (`dup2`), then close the received fd. Every received fd is closed,
        whatever happens. Raises ValueError, changing nothing, when the lists differ
        in length or name an fd that is not one of our log fds."""
        try:
            if len(numbers) != len(fds):
                raise ValueError(f"{len(numbers)} log fd numbers for {len(fds)} fds")
            unknown = [number for number in numbers if number not in self.fds]
            if unknown:
                raise ValueError(f"fd numbers {unknown} are not log fds (ours: {list(self.fds)})")
            self._flush()
            for number, fd in zip(numbers, fds):
                os.dup2(fd, number, inheritable=os.get_inheritable(number))
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def close(self) -> None:
        """Remove our handlers and close the log files (stdio stays open)."""
        for logger in (self.error, self.access):
            if logger is None:
                continue
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
                handler.close()

    def _flush(self) -> None:
        for logger in (self.error, self.access):
            for handler in (logger.handlers if logger is not None else ()):
                try:
                    handler.flush()
                except (OSError, ValueError):
                    pass


def setup(level: str = "info", error_log: str | None = None, access_log: str | None = None,
          log_format: str = "text", access_log_format: str | None = None) -> Logs:
    """Configure the error logger (stderr when `error_log` is None or "-") and, when
    `access_log` is set ("-": stdout), the access logger.

    `log_format` is "text" or "json"; `access_log_format` is a gunicorn-style format
    (default: `DEFAULT_FORMAT`, or `DEFAULT_JSON_FORMAT` for JSON). Raises ValueError
    for an unknown log format or a bad access format, OSError if a file cannot be opened.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {LOG_FORMATS}, not {log_format!r}")
    as_json = log_format == "json"
    line_formatter = _JsonFormatter() if as_json else _TextFormatter()
    access_line = None
    if access_log:
        fmt = access_log_format or (DEFAULT_JSON_FORMAT if as_json else DEFAULT_FORMAT)
        access_line = compile_format(fmt, json=as_json)   # before opening anything: may raise

    paths: dict[int, str] = {}
    error = _reset(logging.getLogger(ERROR_LOGGER))
    error.setLevel(level.upper())
    error_handler = _handler(error_log, sys.stderr, paths)
    error_handler.setFormatter(line_formatter)
    error.addHandler(error_handler)
    fds = [error_handler.stream.fileno()]

    access = None
    if access_log:
        access = _reset(logging.getLogger(ACCESS_LOGGER))
        access.setLevel(logging.INFO)
        access_handler = _handler(access_log, sys.stdout, paths)
        access_handler.setFormatter(_AccessFormatter(access_line, line_formatter if as_json
                                                     else logging.Formatter("%(message)s")))
        access.addHandler(access_handler)
        fds.append(access_handler.stream.fileno())
    return Logs(error, access, tuple(fds), MappingProxyType(paths), access_line, log_format, access_log_format)


def worker_logs(level: str, log_format: str, access_log_format: str | None, access_fd: int | None) -> Logs:
    """A worker's loggers: errors to its stderr, access lines (when `access_fd` is not
    None) to `access_fd`; both are pipes the master reads, tags and writes to the log
    files. The lines look as `setup` would write them; the master adds who wrote them.
    Raises ValueError for a bad format, like `setup`."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {LOG_FORMATS}, not {log_format!r}")
    as_json = log_format == "json"
    line_formatter = _JsonFormatter() if as_json else _TextFormatter()
    error = _reset(logging.getLogger(ERROR_LOGGER))
    error.setLevel(level.upper())
    error_handler = logging.StreamHandler(sys.stderr)
    error_handler.setFormatter(line_formatter)
    error.addHandler(error_handler)
    if access_fd is None:
        return Logs(error, None, (2,), log_format=log_format)
    fmt = access_log_format or (DEFAULT_JSON_FORMAT if as_json else DEFAULT_FORMAT)
    access_line = compile_format(fmt, json=as_json)
    access = _reset(logging.getLogger(ACCESS_LOGGER))
    access.setLevel(logging.INFO)
    # Not "a": a pipe cannot seek to its end. One write per line: the handler flushes.
    access_handler = _FileHandler(open(access_fd, "w", encoding="utf-8", errors="backslashreplace"))
    access_handler.setFormatter(_AccessFormatter(access_line, line_formatter if as_json
                                                 else logging.Formatter("%(message)s")))
    access.addHandler(access_handler)
    return Logs(error, access, (2, access_fd), access_line=access_line, log_format=log_format,
                access_log_format=access_log_format)


def log_access(logger: logging.Logger, record: AccessRecord) -> None:
    """Log one access record: the cheap path for the server's hot loop. Does nothing
    for a disabled logger; skips `Logger.info`'s caller lookup (a stack walk)."""
    if logger.isEnabledFor(logging.INFO):
        logger.handle(logger.makeRecord(logger.name, logging.INFO, "(access)", 0, record, (), None))


def _reset(logger: logging.Logger) -> logging.Logger:
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = False
    logger.disabled = False
    return logger


def _handler(target: str | None, default_stream, paths: dict[int, str]) -> logging.StreamHandler:
    if target in (None, "-"):
        return logging.StreamHandler(default_stream)
    path = os.path.abspath(target)
    fd = os.open(path, _FILE_FLAGS, FILE_MODE)
    try:
        stream = os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")
    except BaseException:
        os.close(fd)
        raise
    paths[fd] = path
    return _FileHandler(stream)
