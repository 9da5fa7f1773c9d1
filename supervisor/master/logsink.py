"""Workers' log lines, read from their pipes by the master and written to the log files.

A worker runs app code, so it holds no log file: it could truncate one, or write lines
that look like anyone's. It writes instead to two pipes of its own (its stdout and
stderr, which carry its error log, prints, tracebacks and faulthandler's stacks; and,
when access logging is on, its access lines). The master reads them here, in its loop,
and writes each line to the right log with who wrote it in front, a tag the worker
cannot choose: `app[pid]: ` in text, or the "app" and "pid" fields of a JSON line
(whatever the line itself said there).

Three promises, for any bytes a worker writes:

* lines of two workers never merge: each pipe has its own buffer, and a partial line
  at the end of a read waits there for its newline (or for the pipe's end);
* a line longer than `LINE_MAX` is cut there and marked with `CUT_MARK`; the rest of it
  is dropped, so a worker can never make the master hold more than that per pipe;
* a log that cannot be written (a full disk) costs one error line per
  `REPORT_INTERVAL_S` in the error log, never a traceback per line: the lines are
  dropped and counted, and serving goes on.

The cost stays small in the master's loop: one read of up to `READ_SIZE` bytes per
wakeup, one split, and one write per chunk for every destination.

`Lines`, `text_tagger`, `json_tagger` and `Drops` are pure (bytes and a clock in);
`LogSink` does the I/O.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from supervisor.http.accesslog import iso_time
from supervisor.system.log import Logs
from supervisor.system.loop import Loop
from supervisor.system.words import count as counted

LINE_MAX = 32 * 1024            # bytes of one line that reach the log; the rest is cut
CUT_MARK = b" [line cut: longer than %d bytes]" % LINE_MAX
READ_SIZE = 64 * 1024           # a pipe's default capacity: one read empties it
REPORT_INTERVAL_S = 60.0        # at most one "cannot write" error per log this often

_json_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class Lines:
    """Cuts one pipe's byte stream into lines (without their newline).

    `feed` returns the lines the bytes completed; what follows the last newline waits
    for the next `feed`. `end` returns the line the stream ended inside, if any."""

    def __init__(self, line_max: int = LINE_MAX):
        self.line_max = line_max
        self._partial = b""
        self._cutting = False     # inside a line already cut: drop up to its newline

    def feed(self, data: bytes) -> list[bytes]:
        pieces = data.split(b"\n")
        tail = pieces.pop()
        if pieces:
            if self._cutting:
                self._cutting = False
                del pieces[0]
            elif self._partial:
                pieces[0] = self._partial + pieces[0]
                self._partial = b""
            limit = self.line_max
            for i, line in enumerate(pieces):
                if len(line) > limit:
                    pieces[i] = line[:limit] + CUT_MARK
        if not self._cutting and tail:
            partial = self._partial + tail
            if len(partial) > self.line_max:
                pieces.append(partial[:self.line_max] + CUT_MARK)
                partial = b""
                self._cutting = True
            self._partial = partial
        return pieces

    def end(self) -> list[bytes]:
        partial, self._partial, self._cutting = self._partial, b"", False
        return [partial] if partial else []


def text_tagger(app: str, pid: int) -> Callable[[list[bytes]], bytes]:
    """Lines -> one chunk, each line after `app[pid]: `."""
    prefix = f"{app}[{pid}]: ".encode()
    joiner = b"\n" + prefix

    def tag(lines: list[bytes]) -> bytes:
        return prefix + joiner.join(lines) + b"\n"
    return tag


def json_tagger(app: str, pid: int, wall_clock: Callable[[], float] = time.time,
                logger: str = "output") -> Callable[[list[bytes]], bytes]:
    """Lines -> one chunk of JSON lines. A line that is a JSON object (what the worker's
    loggers write) gets our "app" and "pid"; any other line (a print, a traceback,
    something cut) becomes the "message" of an object of ours, with `logger`."""

    def tag(lines: list[bytes]) -> bytes:
        out = []
        for line in lines:
            text = line.decode("utf-8", "backslashreplace")
            try:
                obj = json.loads(text) if text.startswith("{") else None
            except (ValueError, RecursionError):
                obj = None
            if type(obj) is dict:
                obj["app"] = app
                obj["pid"] = pid
            else:
                obj = {"time": iso_time(wall_clock()), "level": "info", "pid": pid, "app": app,
                       "message": text, "logger": logger}
            out.append(_json_encode(obj))
        out.append("")
        return "\n".join(out).encode()
    return tag


class Drops:
    """Counts the lines a log could not take, and says when to report them: at the
    first failure, then at most once per `interval_s` (of the clock passed in)."""

    def __init__(self, interval_s: float = REPORT_INTERVAL_S):
        self.interval_s = interval_s
        self.total = 0           # lines dropped, ever
        self.unreported = 0      # since the last report
        self._reported_at: float | None = None

    def failed(self, now: float, lines: int) -> int | None:
        """`lines` were lost at `now`; the count to report now, or None (not yet)."""
        self.total += lines
        self.unreported += lines
        if self._reported_at is not None and now - self._reported_at < self.interval_s:
            return None
        self._reported_at = now
        count, self.unreported = self.unreported, 0
        return count

    def succeeded(self) -> int | None:
        """A write went through: after failures, the count dropped since the last
        report (once); else None."""
        if self._reported_at is None:
            return None
        count, self.unreported, self._reported_at = self.unreported, 0, None
        return count


class Destination:
    """One log fd the sink writes to (by number, so a reopen's `dup2` is followed)."""

    def __init__(self, fd: int, name: str, log: logging.Logger, clock: Callable[[], float],
                 interval_s: float = REPORT_INTERVAL_S):
        self.fd = fd
        self.name = name
        self.log = log
        self.clock = clock
        self.drops = Drops(interval_s)

    def write(self, chunk: bytes, lines: int) -> None:
        view = memoryview(chunk)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as exc:
            count = self.drops.failed(self.clock(), lines)
            if count is not None:
                self.log.error("cannot write to the %s: %s; dropped %s since the last report "
                               "(%d in all), dropping more until it can be written; serving goes on",
                               self.name, exc.strerror or exc, counted(count, "line"), self.drops.total)
            return
        count = self.drops.succeeded()
        if count is not None:
            self.log.warning("the %s can be written again; %s more dropped (%d in all)",
                             self.name, counted(count, "line"), self.drops.total)


@dataclass(eq=False)
class Stream:
    """One worker pipe's read end, what it has half-read, and where its lines go."""
    fd: int
    lines: Lines
    tag: Callable[[list[bytes]], bytes]
    destination: Destination


@dataclass(eq=False)
class Pipes:
    """A worker's log pipes before its fork: the worker gets the write ends."""
    error_r: int
    error_w: int
    access_r: int = -1
    access_w: int = -1
    streams: list[Stream] = field(default_factory=list)

    def close_write_ends(self) -> None:
        for name in ("error_w", "access_w"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


class LogSink:
    """Reads every worker's pipes on the master's loop and writes tagged lines to the
    master's error and access logs (`logs`' fds). `open()` makes a worker's pipes,
    `follow()` starts reading them once its pid is known, `finish()` takes its last
    lines and closes them. Every fd it opened is closed by `finish()` or `discard()`."""

    def __init__(self, loop: Loop, logs: Logs, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        self.loop = loop
        self.json = logs.log_format == "json"
        self.wall_clock = wall_clock
        self.error = Destination(logs.fds[0], "error log", logs.error, clock)
        access_fd = logs.access_fd
        self.access = None if access_fd is None else Destination(access_fd, "access log", logs.error, clock)

    def open(self) -> Pipes:
        error_r, error_w = os.pipe()
        pipes = Pipes(error_r, error_w)
        if self.access is not None:
            try:
                pipes.access_r, pipes.access_w = os.pipe()
            except OSError:
                self.discard(pipes)
                raise
        return pipes

    def follow(self, app: str, pid: int, pipes: Pipes) -> None:
        pipes.close_write_ends()
        pairs = [(pipes.error_r, self.error, "output")]
        if pipes.access_r >= 0:
            pairs.append((pipes.access_r, self.access, "access"))
        for fd, destination, logger in pairs:
            tag = json_tagger(app, pid, self.wall_clock, logger) if self.json else text_tagger(app, pid)
            stream = Stream(fd, Lines(), tag, destination)
            os.set_blocking(fd, False)
            pipes.streams.append(stream)
            self.loop.register(fd, lambda stream=stream: self._on_readable(stream))

    def finish(self, pipes: Pipes) -> None:
        """The worker is gone: write what is left in its pipes (a grandchild that kept
        a write end loses what it writes later) and close them."""
        for stream in pipes.streams:
            while self._on_readable(stream):
                pass
            self._end(stream)
        pipes.streams.clear()
        self.discard(pipes)

    def discard(self, pipes: Pipes) -> None:
        """Close whatever fds of `pipes` are still open, unread (a fork that failed)."""
        pipes.close_write_ends()
        for name in ("error_r", "access_r"):
            fd = getattr(pipes, name)
            if fd >= 0:
                os.close(fd)
                setattr(pipes, name, -1)

    def _on_readable(self, stream: Stream) -> bool:
        """Move one read's lines on; False once nothing more can be read now."""
        if stream.fd < 0:
            return False
        try:
            data = os.read(stream.fd, READ_SIZE)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._end(stream)
            return False
        lines = stream.lines.feed(data)
        if lines:
            stream.destination.write(stream.tag(lines), len(lines))
        return True

    def _end(self, stream: Stream) -> None:
        """The pipe ended (or its worker is gone): its unfinished line, then stop reading."""
        lines = stream.lines.end()
        if lines:
            stream.destination.write(stream.tag(lines), len(lines))
        if stream.fd >= 0 and self.loop.registered(stream.fd):
            self.loop.unregister(stream.fd)
        stream.fd = -1   # closed with its Pipes
