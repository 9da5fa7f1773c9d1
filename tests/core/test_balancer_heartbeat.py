"""The balancer's heartbeat, sent from its loop (issue #11, item 5): on a fake clock,
one per interval while the loop turns, none while it does not."""
from __future__ import annotations

import logging
import socket

from supervisor.balancer.process import Balancer
from supervisor.ipc import channel
from supervisor.ipc.messages import Heartbeat
from supervisor.system.log import Logs


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def pending(sock: socket.socket) -> list:
    messages = []
    while True:
        try:
            message, fds = channel.receive(sock)
        except BlockingIOError:
            return messages
        assert fds == []
        messages.append(message)


def test_one_heartbeat_per_interval_from_the_loop_and_none_without_an_interval():
    clock = FakeClock()
    payload = {"listeners": {"web": ("a",)}, "proxy": (),
               "apps": {"a": {"hosts": (), "default": False, "balance": "least-connections"}}}
    logs = Logs(logging.getLogger("tests.balancer_heartbeat"), None, ())
    balancers = []
    try:
        for heartbeat_s in (1.0, None):
            master, end = channel.pair()
            master.setblocking(False)
            listener = socket.socket()   # the balancer's own: it closes it
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)
            balancer = Balancer(payload, {"web": listener}, end, {}, logs, clock=clock, heartbeat_s=heartbeat_s)
            balancers.append((balancer, master, end))
        (beating, beating_master, _), (silent, silent_master, _) = balancers
        beating.loop.run_once(max_wait_s=0)
        assert pending(beating_master) == []              # not before the first interval
        for _ in range(3):
            clock.now += 1.0
            beating.loop.run_once(max_wait_s=0)
            silent.loop.run_once(max_wait_s=0)
            assert pending(beating_master) == [Heartbeat(requests=0, connections=0, busy=0, oldest_s=None)]
        clock.now += 5.0                                  # the loop does not turn: nothing is sent
        assert pending(beating_master) == []
        assert pending(silent_master) == []
    finally:
        for balancer, master, end in balancers:
            balancer.close()
            master.close()
            end.close()
