"""`timeout` through real workers (issue #11, item 11).

The hung-request deadline used to be measured from the worker's last heartbeat, not
from the request's start, so it fired up to one heartbeat interval early: requests
well within `timeout` aborted workers. And a SIGSTOPped worker was killed with the
promise of stacks it could not write (SIGABRT waits while a process is stopped).
"""
from __future__ import annotations

import os
import signal

import pytest
from conftest import REPO, free_port, get_json, http_request, probe_config, wait_for


def config(port, *, workers, timeout):
    return probe_config(port, f"workers = {workers}\ntimeout = {timeout}")


@pytest.mark.timeout(90)
def test_requests_shorter_than_timeout_abort_no_worker(baton, port):
    """Calls of 1.7 s under `timeout = 2` (heartbeats every 0.5 s), each starting late
    in a heartbeat interval, where the old rule cut it short. A worker's heartbeat
    fires as a call returns, so back-to-back calls start early in one; a call on
    another app in between (its workload, 1.2-1.45 s) leaves this worker idle long
    enough to start the next call 0.2-0.45 s after a heartbeat."""
    other = free_port()
    master = baton(config(port, workers=1, timeout=2) + f"""
        [listeners.other]
        bind = "127.0.0.1:{other}"

        [apps.other]
        module = "tests.apps.probe:app"
        listeners = ["other"]
        chdir = "{REPO}"
    """)
    workers = set(master.wait_workers(2))
    statuses = []
    for gap, duration in ((1.4, 1.7), (1.45, 1.7), (1.35, 1.6), (1.2, 1.5)):
        statuses.append(http_request(other, f"/?sleep={gap}", timeout=30)[0])
        statuses.append(http_request(port, f"/?sleep={duration}", timeout=30)[0])
    assert statuses == [200] * 8
    log = master.log()
    assert "timed out" not in log and "aborting it" not in log
    assert set(master.wait_workers(2)) == workers   # the very same workers


@pytest.mark.timeout(60)
def test_a_stopped_worker_is_replaced_and_its_stacks_reach_the_log(baton, port):
    master = baton(config(port, workers=1, timeout=1))
    (stopped,) = master.wait_workers(1)
    os.kill(stopped, signal.SIGSTOP)
    (replacement,) = master.wait_workers(1, exclude=(stopped,), timeout=20)
    assert get_json(port)["pid"] == replacement
    master.wait_log(f"(pid {stopped}) timed out (silent for")
    # Woken (SIGCONT) before the SIGABRT, it wrote its stacks, then died of the abort.
    wait_for(lambda: "Fatal Python error: Aborted" in master.log().split(f"(pid {stopped}) timed out", 1)[1],
             message=lambda: f"the stopped worker's stacks; log:\n{master.log()}")
    assert "Current thread" in master.log() or "Thread 0x" in master.log()
