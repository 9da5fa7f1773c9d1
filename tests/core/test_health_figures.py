"""Where /metrics' figures come from, piece by piece: a worker's request counts
(http.stats), its STATS messages, soon and rate-limited (worker.stats), the master's
totals that outlive workers and processes (master.figures), restarts by reason (the
supervision core), and METRICS split over several messages for many apps."""
from __future__ import annotations

import socket

import pytest
from test_supervision import Harness as Supervision
from test_supervision import app_config

from supervisor.http.stats import RequestStats
from supervisor.ipc import channel
from supervisor.ipc.messages import (
    MAX_MESSAGE_BYTES,
    REQUEST_DURATION_BOUNDS_S,
    Metrics,
    Stats,
    encode,
)
from supervisor.master import figures
from supervisor.master import supervision as sv
from supervisor.master.figures import ProcessSample, ProcessTotals, RequestTotals
from supervisor.master.lifecycle import State
from supervisor.system.loop import Loop
from supervisor.worker.stats import STATS_MIN_INTERVAL_S, StatsSender

BUCKETS = len(REQUEST_DURATION_BOUNDS_S) + 1


def bucket_of(bound: float | None) -> int:
    return len(REQUEST_DURATION_BOUNDS_S) if bound is None else REQUEST_DURATION_BOUNDS_S.index(bound)


# (status, duration_s, class index, bucket: the bound it falls under, None for +Inf)
ANSWERS = [
    ("200", 0.0, 1, 0.001),
    ("204 No Content", 0.001, 1, 0.001),     # a bound itself is inside its bucket
    ("301", 0.0011, 2, 0.0025),
    ("404", 0.3, 3, 0.5),
    ("503", 29.9, 4, 30.0),
    ("500", 31.0, 4, None),
    ("101", -0.5, 0, 0.001),                 # a clock step back counts as 0
]


@pytest.mark.parametrize("status,duration_s,klass,bound", ANSWERS)
def test_an_answer_is_counted_once_by_class_and_bucket(status, duration_s, klass, bound):
    stats = RequestStats()
    stats.answered(status, duration_s)
    message = stats.snapshot()
    assert message.responses == tuple(int(i == klass) for i in range(5))
    assert message.durations == tuple(int(i == bucket_of(bound)) for i in range(BUCKETS))
    assert message.duration_sum_s == max(0.0, duration_s)
    assert not stats.changed


def test_in_flight_counts_started_requests_until_they_finish():
    stats = RequestStats()
    told = []
    stats.on_started = lambda: told.append(stats.in_flight)
    stats.started()
    stats.started()
    stats.finished("200", 0.01)
    assert told == [1, 2] and stats.in_flight == 1 and stats.changed
    stats.answered("400", 0.0)   # Baton's own answer: never started
    stats.finished("200", 0.01)
    stats.finished("200", 0.01)  # more ends than starts cannot go below zero
    assert stats.in_flight == 0 and sum(stats.snapshot().responses) == 4


class FakeClock:
    def __init__(self):
        self.now = 50.0

    def __call__(self):
        return self.now


@pytest.fixture
def sender():
    clock = FakeClock()
    loop = Loop(clock)
    ours, theirs = channel.pair()
    ours.setblocking(False)
    stats = RequestStats()
    yield clock, loop, StatsSender(loop, theirs, stats), stats, ours
    loop.close()
    ours.close()
    theirs.close()


def received(sock: socket.socket) -> list[Stats]:
    messages = []
    while True:
        try:
            message, _ = channel.receive(sock)
        except BlockingIOError:
            return messages
        messages.append(message)


def test_figures_go_out_at_once_after_a_quiet_spell_then_at_most_every_interval(sender):
    clock, loop, stats_sender, stats, master = sender
    stats_sender.after_events()
    assert received(master) == []        # nothing changed: nothing sent
    stats.answered("200", 0.01)
    stats_sender.after_events()
    (first,) = received(master)
    assert first.responses[1] == 1
    stats.answered("404", 0.01)
    stats_sender.after_events()
    stats.answered("404", 0.01)
    stats_sender.after_events()
    assert received(master) == []        # within the interval: one timer, not a message each
    clock.now += STATS_MIN_INTERVAL_S
    loop.run_once(0)
    (second,) = received(master)
    assert second.responses[3] == 2      # both, in one message that says everything
    clock.now += STATS_MIN_INTERVAL_S
    loop.run_once(0)
    assert received(master) == []


def test_a_request_that_starts_on_a_quiet_worker_is_said_before_it_runs(sender):
    clock, loop, stats_sender, stats, master = sender
    stats.started()   # (the server calls this, then runs the app on the loop)
    (message,) = received(master)
    assert message.in_flight == 1


def test_the_last_figures_are_flushed_when_the_worker_exits(sender):
    clock, loop, stats_sender, stats, master = sender
    stats.answered("200", 0.01)
    stats_sender.after_events()
    stats.answered("500", 0.01)
    stats_sender.after_events()   # deferred...
    stats_sender.flush()          # ...but the worker is leaving
    messages = received(master)
    assert messages[-1].responses == (0, 1, 0, 0, 1) and stats_sender.timer is None


def stats_of(responses=(0, 0, 0, 0, 0), in_flight=0, bucket=0, sum_s=0.0) -> Stats:
    durations = [0] * BUCKETS
    durations[bucket] = sum(responses)
    return Stats(in_flight=in_flight, responses=tuple(responses), durations=tuple(durations), duration_sum_s=sum_s)


def test_request_totals_outlive_the_workers_that_counted_them():
    totals = RequestTotals()
    totals.update(1, "a", stats_of((0, 3, 0, 1, 0), in_flight=1, sum_s=0.5))
    totals.update(2, "a", stats_of((0, 1, 0, 0, 0), in_flight=2, sum_s=0.25))
    totals.keep_only({1, 2}, {"a"})
    before = totals.per_app({"a", "idle"})
    assert before["a"]["baton_requests_total"] == 5 and before["a"]["baton_requests_in_flight"] == 3
    assert before["a"]["baton_responses_total:2xx"] == 4 and before["a"]["baton_request_duration_seconds_sum"] == 0.75
    assert before["idle"]["baton_requests_total"] == 0 and before["idle"]["baton_responses_total:5xx"] == 0
    totals.keep_only({2}, {"a"})             # worker 1 is gone...
    totals.update(3, "a", stats_of())        # ...and its replacement has served nothing yet
    after = totals.per_app({"a"})["a"]
    assert after["baton_requests_total"] == 5 and after["baton_requests_in_flight"] == 2   # a gauge: live ones only
    assert after["baton_request_duration_seconds:0.001"] == 5
    totals.keep_only(set(), set())           # the app was removed and its workers are gone
    assert totals.per_app(set()) == {}


def test_process_totals_keep_a_gone_processs_cpu_and_forget_its_memory():
    totals = ProcessTotals()
    totals.observe({(10, "master", ""): ProcessSample(1.0, 100, 5),
                    (20, "worker", "a"): ProcessSample(2.0, 200, 7),
                    (21, "worker", "a"): ProcessSample(0.5, 300, None)}, {"a"})
    per_app, overall = totals.figures()
    assert overall == {"process_cpu_seconds_total:master": 1.0, "process_resident_memory_bytes:master": 100,
                       "process_open_fds:master": 5}
    assert per_app["a"] == {"process_cpu_seconds_total:worker": 2.5, "process_resident_memory_bytes:worker": 500,
                            "process_open_fds:worker": 7}
    totals.observe({(10, "master", ""): ProcessSample(1.5, 100, 5),
                    (22, "worker", "a"): ProcessSample(0.25, 250, 6)}, {"a"})   # 20 and 21 replaced by 22
    per_app, _ = totals.figures()
    assert per_app["a"] == {"process_cpu_seconds_total:worker": 2.75, "process_resident_memory_bytes:worker": 250,
                            "process_open_fds:worker": 6}
    totals.observe({(10, "master", ""): ProcessSample(1.5, 100, 5)}, set())   # app a removed
    assert totals.figures()[0] == {}


def full_app() -> dict[str, float]:
    app = RequestTotals().per_app({"x"})["x"]
    app.update(figures.restart_figures({"crash": 1}))
    app.update({"baton_workers": 64, "process_cpu_seconds_total:worker": 12.5,
                "process_resident_memory_bytes:worker": 2**40, "process_open_fds:worker": 10**6,
                "baton_handoffs_total": 10**12, "baton_connections": 10**5})
    return app


def test_many_apps_travel_in_several_metrics_messages_that_the_balancer_puts_together(harnesses):
    apps = {f"app-{index:03}-{'n' * 40}": full_app() for index in range(100)}
    messages = figures.messages_for(apps, {"baton_reloads_total": 3})
    assert len(messages) > 1 and [m.more for m in messages] == [True] * (len(messages) - 1) + [False]
    assert all(len(encode(m)) <= MAX_MESSAGE_BYTES for m in messages)
    harness = harnesses()
    balancer = harness.balancer
    for message in messages:
        balancer._on_metrics(message, [])
        if message.more:
            assert balancer.master_figures == Metrics(apps={}, overall={})   # not until the last
    assert balancer.master_figures.apps == apps and balancer.master_figures.overall == {"baton_reloads_total": 3}
    text = balancer.metrics_text()
    assert text.count("baton_worker_restarts_total{") == 100 * len(figures.RESTART_REASONS)


def test_restarts_are_counted_by_reason():
    core = Supervision()
    config = app_config(workers=2, max_requests=3, timeout=2)
    core.start(config)
    reasons = lambda: core.core.apps["web"].restart_reasons   # noqa: E731
    first, second = core.keys(state=State.READY)
    core.event(sv.Exited(first, "killed by SIGKILL"))
    assert reasons() == {"crash": 1}
    core.event(sv.Heartbeat(second, requests=3, connections=0, busy=0, oldest_s=None))
    assert reasons() == {"crash": 1, "max_requests": 1}
    core.advance(0.2)                                   # the crash's backoff, if any
    core.ready_all()
    serving = core.keys(state=State.READY)
    core.event(sv.Heartbeat(serving[-1], requests=0, connections=0, busy=1, oldest_s=0.0))
    core.advance(2.1)          # past its request's timeout; the others are not silent for that long yet
    assert reasons()["timeout"] == 1
    core.ready_all()
    ready = len(core.keys(state=State.READY, generation=1))
    core.run(core.core.restart_app("web", config, "www-data"))
    core.ready_all()                                    # generation 2 switches in
    assert reasons()["reload"] == ready
    booting = core.keys(state=State.READY, generation=2)[0]
    core.event(sv.Exited(booting, "exit status 1"))
    assert reasons()["crash"] == 2
