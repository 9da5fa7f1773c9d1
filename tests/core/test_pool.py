"""The worker's thread pool (supervisor.http.pool) on a real loop: what finishes comes
back on the loop's thread; after shutdown, the pool threads abandon what they finish."""
from __future__ import annotations

import logging
import threading

import pytest
from conftest import wait_for

from supervisor.http.pool import Pool
from supervisor.system.loop import Loop

DEADLINE_S = 10.0


class Recorder:
    """run/finished/abandon callbacks that note which thread called them."""

    def __init__(self):
        self.ran: list[tuple[object, str]] = []
        self.finished: list[tuple[object, str]] = []
        self.abandoned: list[tuple[object, str]] = []
        self.gates: dict[object, threading.Event] = {}

    def run(self, item):
        gate = self.gates.get(item)
        if gate is not None:
            assert gate.wait(DEADLINE_S)
        if item == "boom":
            raise RuntimeError("the app broke")
        self.ran.append((item, threading.current_thread().name))

    def on_finished(self, item):
        self.finished.append((item, threading.current_thread().name))

    def on_abandoned(self, item):
        self.abandoned.append((item, threading.current_thread().name))


@pytest.fixture
def loop():
    loop = Loop()
    yield loop
    loop.close()


def run_until(loop: Loop, condition) -> None:
    for _ in range(1000):
        if condition():
            return
        loop.run_once(max_wait_s=DEADLINE_S / 1000)
    raise AssertionError("the loop never got there")


def test_finished_items_come_back_on_the_loops_thread(loop, caplog):
    rec = Recorder()
    pool = Pool(2, rec.run, rec.on_finished, rec.on_abandoned, loop, logging.getLogger("test.pool"))
    for item in ("a", "b", "boom", "c"):
        pool.submit(item)
    assert pool.busy == 4 and pool.size == 2
    run_until(loop, lambda: len(rec.finished) == 4)
    loop_thread = threading.current_thread().name
    assert sorted(rec.finished) == sorted((item, loop_thread) for item in ("a", "b", "boom", "c"))
    assert {name for _, name in rec.ran} <= {"baton-http-0", "baton-http-1"}
    assert pool.busy == 0 and rec.abandoned == []
    assert "unexpected error serving a request" in caplog.text   # logged, and it still finished
    pool.shutdown()


def test_after_shutdown_the_thread_that_finishes_an_item_abandons_it(loop):
    rec = Recorder()
    rec.gates["late"] = threading.Event()
    pool = Pool(1, rec.run, rec.on_finished, rec.on_abandoned, loop, logging.getLogger("test.pool"))
    pool.submit("late")
    pool.shutdown()                  # while "late" is still running
    rec.gates["late"].set()
    wait_for(lambda: rec.abandoned, DEADLINE_S, message="the late item abandoned")
    assert rec.abandoned == [("late", "baton-http-0")]
    loop.run_once(max_wait_s=0)
    assert rec.finished == []        # nothing reaches the loop after shutdown


def test_shutdown_abandons_what_finished_but_was_not_delivered(loop):
    rec = Recorder()
    pool = Pool(1, rec.run, rec.on_finished, rec.on_abandoned, loop, logging.getLogger("test.pool"))
    pool.submit("done")
    wait_for(lambda: rec.ran, DEADLINE_S, message="the item run")
    pool.shutdown()                  # the loop never ran: "done" was not delivered
    wait_for(lambda: rec.abandoned, DEADLINE_S, message="the item abandoned")
    assert [item for item, _ in rec.abandoned] == ["done"] and rec.finished == []
