"""The shared event loop (supervisor.system.loop): fds, stale events, timers on a fake
clock, signals and wakeups from threads."""
from __future__ import annotations

import os
import signal
import socket
import threading
import weakref

import pytest

from supervisor.system.loop import EDGE, HANGUP, READ, WRITE, Loop


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def loop(clock):
    loop = Loop(clock)
    yield loop
    loop.close()


@pytest.fixture
def pairs():
    made = []

    def make():
        pair = socket.socketpair()
        made.append(pair)
        return pair
    yield make
    for a, b in made:
        a.close()
        b.close()


def test_a_readable_fd_runs_its_handler(loop, pairs):
    a, b = pairs()
    seen = []
    loop.register(a, lambda: seen.append(a.recv(10)))
    b.send(b"hi")
    loop.run_once(max_wait_s=1)
    assert seen == [b"hi"]


def test_modify_switches_direction_and_handler(loop, pairs):
    a, _ = pairs()
    seen = []
    loop.register(a, lambda: seen.append("read"))
    loop.modify(a, WRITE, lambda: seen.append("write"))
    loop.run_once(max_wait_s=1)
    assert seen == ["write"]
    loop.modify(a, READ)
    loop.run_once(max_wait_s=0)
    assert seen == ["write"]   # nothing to read: the old handler is kept, and not called


def test_registering_twice_is_a_bookkeeping_bug(loop, pairs):
    a, _ = pairs()
    loop.register(a, lambda: None)
    with pytest.raises(KeyError):
        loop.register(a, lambda: None)
    loop.unregister(a)
    with pytest.raises(KeyError):
        loop.unregister(a)


def test_an_fd_closed_by_an_earlier_handler_gets_no_stale_event(loop, pairs):
    """Both fds are ready in one batch; whichever handler runs first closes the other
    fd and opens a socket that takes its number. The closed fd's event from that batch
    must reach neither the old handler nor the new socket's."""
    a, a_peer = pairs()
    b, b_peer = pairs()
    calls = []
    fresh = []

    def close(victim, name):
        def handler():
            calls.append(name)
            number = victim.fileno()
            loop.unregister(victim)
            victim.close()
            sock = socket.socket(fileno=os.dup2(a_peer.fileno(), number))
            fresh.append(sock)
            loop.register(sock, lambda: calls.append("new socket"))
        return handler

    loop.register(a, close(b, "a"))
    loop.register(b, close(a, "b"))
    a_peer.send(b"x")
    b_peer.send(b"x")
    loop.run_once(max_wait_s=1)
    assert len(calls) == 1, calls
    for sock in fresh:
        loop.unregister(sock)
        sock.close()


def test_an_edge_triggered_fd_runs_once_per_arrival_not_while_it_stays_readable(loop, pairs):
    # Bytes only peeked at stay in the socket: level-triggered, the handler would run
    # on every iteration; edge-triggered, once for each arrival (and for the hang-up).
    edge, edge_peer = pairs()
    level, level_peer = pairs()
    calls = []
    loop.register(edge, lambda: calls.append(("edge", edge.recv(64, socket.MSG_PEEK))), READ | HANGUP | EDGE)
    loop.register(level, lambda: calls.append(("level", level.recv(64, socket.MSG_PEEK))))
    edge_peer.send(b"GET / HT")
    level_peer.send(b"GET / HT")
    for _ in range(3):
        loop.run_once(max_wait_s=0)
    assert calls.count(("edge", b"GET / HT")) == 1
    assert calls.count(("level", b"GET / HT")) == 3
    calls.clear()
    edge_peer.send(b"TP/1.1")
    edge_peer.shutdown(socket.SHUT_WR)
    loop.run_once(max_wait_s=1)
    loop.run_once(max_wait_s=0)
    assert [call for call in calls if call[0] == "edge"] == [("edge", b"GET / HTTP/1.1")]


def test_forget_closed_drops_the_handler_without_a_syscall(loop, pairs):
    a, b = pairs()
    calls = []
    loop.register(a, lambda: calls.append("a"))
    fd = a.fileno()
    a.close()
    loop.forget_closed(fd)
    assert not loop.registered(fd)
    other, other_peer = pairs()   # may take the closed fd's number: a registration anew works
    loop.register(other, lambda: calls.append("other"))
    other_peer.send(b"x")
    loop.run_once(max_wait_s=1)
    assert calls == ["other"]


def test_timers_fire_in_order_when_the_clock_reaches_them(loop, clock):
    fired = []
    loop.call_later(2.0, lambda: fired.append("2s"))
    loop.call_later(1.0, lambda: fired.append("1s"))
    loop.call_at(clock.now + 3.0, lambda: fired.append("3s"))
    clock.now += 0.5
    loop.run_once(max_wait_s=0)
    assert fired == []
    clock.now += 1.6
    loop.run_once(max_wait_s=0)
    assert fired == ["1s", "2s"]
    clock.now += 10
    loop.run_once(max_wait_s=0)
    assert fired == ["1s", "2s", "3s"]
    assert loop.next_deadline() is None


def test_a_cancelled_timer_never_runs_and_leaves_the_deadline(loop, clock):
    fired = []
    early = loop.call_later(1.0, lambda: fired.append("early"))
    loop.call_later(5.0, lambda: fired.append("late"))
    early.cancel()
    early.cancel()   # twice is harmless
    assert loop.next_deadline() == clock.now + 5.0
    clock.now += 6
    loop.run_once(max_wait_s=0)
    assert fired == ["late"]


def test_many_cancellations_compact_the_heap_and_keep_order(loop, clock):
    fired = []
    timers = [loop.call_later(float(i), lambda i=i: fired.append(i)) for i in range(1, 301)]
    for i, timer in enumerate(timers, 1):
        if i % 3:
            timer.cancel()
    loop.call_later(0.5, lambda: fired.append(0))   # a push after many cancels compacts
    assert len(loop._timers) < 300
    clock.now += 1000
    loop.run_once(max_wait_s=0)
    assert fired == [0, *range(3, 301, 3)]


def test_every_repeats_from_when_it_ran_until_cancelled(loop, clock):
    ticks = []
    timer = loop.every(1.0, lambda: ticks.append(clock.now))
    for _ in range(3):
        clock.now += 1.0
        loop.run_once(max_wait_s=0)
    assert len(ticks) == 3
    clock.now += 5.0   # a stuck loop: one late tick, not five
    loop.run_once(max_wait_s=0)
    assert len(ticks) == 4
    timer.cancel()
    clock.now += 5.0
    loop.run_once(max_wait_s=0)
    assert len(ticks) == 4
    assert loop.next_deadline() is None


def test_a_timer_may_cancel_its_own_repetition(loop, clock):
    ticks = []

    def once():
        ticks.append(1)
        timer.cancel()
    timer = loop.every(1.0, once)
    for _ in range(3):
        clock.now += 1.0
        loop.run_once(max_wait_s=0)
    assert ticks == [1]


def test_a_cancelled_timer_lets_go_of_its_callback_at_once(loop, clock):
    """A cancelled timer may wait in the heap until its time or a compaction: what its
    callback refers to (a closed connection, say) must not wait with it."""
    class Owner:
        def fire(self):
            raise AssertionError("a cancelled timer ran")
    owner = Owner()
    gone = weakref.ref(owner)
    timer = loop.call_later(60.0, owner.fire)
    loop.call_later(120.0, lambda: None)
    del owner
    assert gone() is not None
    timer.cancel()
    assert gone() is None
    assert len(loop._timers) == 2   # still queued: dropped lazily
    clock.now += 200
    loop.run_once(max_wait_s=0)


def test_the_wait_is_bounded_by_the_nearest_timer(loop):
    """A real clock: the wait returns for the timer, with no fd ready."""
    real = Loop()
    try:
        fired = []
        real.call_later(0.01, lambda: fired.append(True))
        while not fired:
            real.run_once(max_wait_s=5)
        assert fired == [True]
    finally:
        real.close()


def test_before_wait_and_after_events_run_every_iteration(loop, clock):
    order = []
    loop.before_wait(lambda: order.append("before"))
    loop.after_events(lambda: order.append("after"))
    loop.call_later(0, lambda: order.append("timer"))
    loop.run_once(max_wait_s=0)
    assert order == ["before", "timer", "after"]


def test_stop_from_a_handler_ends_run(loop, pairs):
    a, b = pairs()

    def handler():
        a.recv(10)
        loop.stop()
    loop.register(a, handler)
    b.send(b"x")
    loop.run()
    assert not loop.running


def test_stop_from_before_wait_skips_the_wait(loop):
    loop.before_wait(loop.stop)
    loop.run()   # returns at once: a wait with no fd and no timer would never end


def test_a_signal_runs_its_callback_in_the_loop(loop):
    seen = []
    loop.on_signal(signal.SIGUSR1, seen.append)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        while not seen:
            loop.run_once(max_wait_s=5)
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def test_another_thread_wakes_the_loop(loop):
    woken = []
    wake = loop.threadsafe_waker(lambda: woken.append(True))
    thread = threading.Thread(target=lambda: [wake() for _ in range(5)])
    thread.start()
    thread.join()
    while not woken:
        loop.run_once(max_wait_s=5)
    assert woken == [True]   # five calls, one wakeup


def test_close_releases_the_loops_own_fds():
    before = set(os.listdir("/proc/self/fd"))
    loop = Loop()
    loop.on_signal(signal.SIGUSR2, lambda signum: None)
    loop.threadsafe_waker(lambda: None)
    loop.close()
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    assert set(os.listdir("/proc/self/fd")) <= before
