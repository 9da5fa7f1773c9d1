"""The balancer out of the apps' reach, and replaced when it stops (issue #11, item 5).

An app's workers run as `nobody` when they name no user; the balancer used to run as
`nobody` too, so any such app could SIGSTOP or SIGKILL it, and a stopped balancer went
unnoticed. Now it runs as an id no app has, and the master replaces it when its loop
falls silent.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest
from conftest import (
    alive,
    answers,
    http_request,
    probe_config,
    proc_status,
    wait_for,
)

ROOT = os.geteuid() == 0


def config(port):
    return probe_config(port)


@pytest.mark.skipif(not ROOT, reason="apps and the balancer have different users only under root")
def test_a_process_running_as_an_app_user_cannot_signal_the_balancer(baton, port):
    master = baton(config(port))
    (worker,) = master.wait_workers(1)
    balancer = master.balancer()
    assert proc_status(worker)["Uid"].split()[0] != proc_status(balancer)["Uid"].split()[0]
    # What app code could do: the app names no user, so its workers run as nobody.
    attempt = subprocess.run([sys.executable, "-c", f"import os; os.kill({balancer}, 0)"], user="nobody",
                             capture_output=True, text=True, timeout=30)
    assert attempt.returncode != 0 and "PermissionError" in attempt.stderr


@pytest.mark.timeout(90)
def test_a_stopped_balancer_is_replaced_and_requests_are_served_again(baton, port):
    master = baton(config(port))
    master.wait_workers(1)
    first = master.balancer()
    wait_for(lambda: answers(port), message=lambda: f"the app to answer; log:\n{master.log()}")
    os.kill(first, signal.SIGSTOP)
    # Sent while the balancer is stopped: it waits in the listener's backlog.
    waiting: dict = {}
    client = threading.Thread(target=lambda: waiting.update(answer=http_request(port, "/", timeout=60)))
    client.start()
    wait_for(lambda: not alive(first), timeout=30,
             message=lambda: f"the stopped balancer to be ended; log:\n{master.log()}")
    wait_for(lambda: master.balancer() != first, timeout=30, message=lambda: f"a new balancer; log:\n{master.log()}")
    client.join(60)
    assert waiting["answer"][0] == 200
    assert {http_request(port, "/")[0] for _ in range(5)} == {200}
    log = master.log()
    assert "balancer sent no heartbeat for" in log and "(stopped or stuck): aborting it" in log
    # Woken before the abort, it wrote its stacks: the loop's wait is where it was stopped.
    assert "Fatal Python error: Aborted" in log and "supervisor/system/loop.py" in log
