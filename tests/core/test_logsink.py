"""The master's side of workers' log lines: cutting, tagging, and a log it cannot write."""
from __future__ import annotations

import json
import logging
import os

import pytest

from supervisor.master.logsink import (
    CUT_MARK,
    Destination,
    Drops,
    Lines,
    LogSink,
    json_tagger,
    text_tagger,
)
from supervisor.system.log import Logs
from supervisor.system.loop import Loop

# (chunks fed one after another, lines out after each, what `end` returns), line_max 8
LINES = [
    ([b"a\n"], [[b"a"]], []),
    ([b"a\nb\n"], [[b"a", b"b"]], []),
    ([b"a\nb"], [[b"a"]], [b"b"]),
    ([b"ab", b"c\n"], [[], [b"abc"]], []),                         # a partial line waits
    ([b"ab", b"", b"c\nd", b"e\n"], [[], [], [b"abc"], [b"de"]], []),
    ([b"\n\n"], [[b"", b""]], []),
    ([b"12345678\n"], [[b"12345678"]], []),                        # exactly the bound
    ([b"123456789\n"], [[b"12345678" + CUT_MARK]], []),
    ([b"123456789abc\nnext\n"], [[b"12345678" + CUT_MARK, b"next"]], []),
    # the rest of a cut line is dropped up to its newline, over any number of reads
    ([b"1234", b"56789", b"more", b"rest\nnext\n"],
     [[], [b"12345678" + CUT_MARK], [], [b"next"]], []),
    ([b"123456789", b"x"], [[b"12345678" + CUT_MARK], []], []),     # nothing of it at the end
    ([b"\xff\xfe\n"], [[b"\xff\xfe"]], []),                          # bytes pass as they are
]


@pytest.mark.parametrize("chunks, outs, end", LINES)
def test_lines(chunks, outs, end):
    lines = Lines(line_max=8)
    assert [lines.feed(chunk) for chunk in chunks] == outs
    assert lines.end() == end
    assert lines.end() == []


def test_two_streams_never_merge_their_partial_lines():
    one, two = Lines(), Lines()
    assert one.feed(b"first ha") == [] and two.feed(b"second ha") == []
    assert two.feed(b"lf\n") == [b"second half"]
    assert one.feed(b"lf\n") == [b"first half"]


def test_text_tag_is_a_prefix_on_every_line():
    tag = text_tagger("blog", 42)
    assert tag([b"one"]) == b"blog[42]: one\n"
    assert tag([b"one", b"[2026] [1] [ERROR] forged", b""]) == (
        b"blog[42]: one\nblog[42]: [2026] [1] [ERROR] forged\nblog[42]: \n")


JSON_LINES = [
    # a worker's own JSON line: our app and pid win over whatever it says
    (b'{"time":"t","level":"error","pid":1,"message":"m","logger":"baton.error"}',
     {"time": "t", "level": "error", "pid": 42, "message": "m", "logger": "baton.error", "app": "blog"}),
    (b'{"app":"other","pid":7,"message":"forged"}', {"app": "blog", "pid": 42, "message": "forged"}),
    # anything else is the message of a line of ours
    (b"print output", {"time": "1970-01-01T00:00:10.000Z", "level": "info", "pid": 42, "app": "blog",
                       "message": "print output", "logger": "output"}),
    (b'["not", "an", "object"]', {"message": '["not", "an", "object"]'}),
    (b'{"broken', {"message": '{"broken'}),
    (b"{" * 30000, {"message": "{" * 30000}),
    (b"caf\xc3\xa9 \xff", {"message": "café \\xff"}),
]


@pytest.mark.parametrize("line, expected", JSON_LINES)
def test_json_tag(line, expected):
    out = json_tagger("blog", 42, wall_clock=lambda: 10.0)([line])
    assert out.endswith(b"\n") and out.count(b"\n") == 1
    obj = json.loads(out)
    assert {key: obj[key] for key in expected} == expected
    assert obj["app"] == "blog" and obj["pid"] == 42


# (event: ("fail", now, lines) or ("ok",), what the call returns)
DROPS = [
    [(("fail", 0.0, 3), 3)],                                     # the first failure: at once
    [(("fail", 0.0, 1), 1), (("fail", 1.0, 2), None), (("fail", 59.9, 1), None), (("fail", 60.0, 4), 7)],
    [(("fail", 0.0, 1), 1), (("fail", 5.0, 2), None), (("ok",), 2), (("ok",), None)],
    [(("ok",), None)],
    [(("fail", 0.0, 1), 1), (("ok",), 0), (("fail", 1.0, 1), 1)],  # a new run of failures reports at once
]


@pytest.mark.parametrize("events", DROPS)
def test_drops_report_once_per_interval(events):
    drops = Drops(interval_s=60.0)
    for event, expected in events:
        got = drops.failed(event[1], event[2]) if event[0] == "fail" else drops.succeeded()
        assert got == expected, event


def test_drops_count_every_line_lost():
    drops = Drops(interval_s=60.0)
    for now in range(10):
        drops.failed(float(now), 2)
    assert drops.total == 20


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def recorded():
    log = logging.getLogger("test.logsink")
    log.propagate = False
    handler = _Records()
    log.addHandler(handler)
    yield log, handler.messages
    log.removeHandler(handler)


def test_a_full_device_costs_one_error_per_interval(recorded):
    log, messages = recorded
    now = [0.0]
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        destination = Destination(fd, "access log", log, lambda: now[0], interval_s=60.0)
        for step in range(100):
            now[0] = step * 1.5     # 150 s of lines
            destination.write(b"line\n", 1)
    finally:
        os.close(fd)
    assert len(messages) == 3   # at 0, 60 and 120 s
    assert "No space left on device" in messages[0] and "dropped 1 line since" in messages[0]
    assert "dropped 40 lines" in messages[1] and "dropped 40 lines" in messages[2]
    assert destination.drops.total == 100


def test_the_sink_tags_each_pipes_lines_and_finishes_a_gone_workers(tmp_path):
    error_path = tmp_path / "error.log"
    error_fd = os.open(error_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    logs = Logs(logging.getLogger("test.sink"), None, (error_fd,))
    loop = Loop()
    sink = LogSink(loop, logs)
    try:
        first, second = sink.open(), sink.open()
        first_w, second_w = os.dup(first.error_w), os.dup(second.error_w)   # the workers' ends
        sink.follow("a", 1, first)
        sink.follow("b", 2, second)
        os.write(first_w, b"one half")
        os.write(second_w, b"other\n")
        loop.run_once(max_wait_s=1)
        loop.run_once(max_wait_s=0)
        os.write(first_w, b" and the rest\nunfinished")
        os.close(first_w)
        sink.finish(first)        # reaped: what is left is written, the pipe closed
        os.close(second_w)
        loop.run_once(max_wait_s=1)
        sink.finish(second)
        assert error_path.read_bytes().splitlines() == [
            b"b[2]: other", b"a[1]: one half and the rest", b"a[1]: unfinished"]
        assert first.error_r == -1 and second.error_r == -1
    finally:
        loop.close()
        os.close(error_fd)
