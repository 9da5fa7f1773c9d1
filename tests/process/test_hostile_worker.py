"""A worker runs untrusted app code, which can write anything on its channels: a real
master and balancer log what it sent and never crash; the master replaces a worker
whose channel carried garbage."""
from __future__ import annotations

import pytest
from conftest import REPO, alive, answers, http_request, wait_for


@pytest.fixture
def hostile(baton, port):
    master = baton(f"""
        [master]
        graceful_timeout = 5
        boot_timeout = 10

        [listeners.web]
        bind = "127.0.0.1:{port}"

        [apps.hostile]
        module = "tests.apps.hostile:app"
        listeners = ["web"]
        chdir = "{REPO}"
    """)
    (worker,) = master.wait_workers(1)
    return master, master.balancer(), worker


def test_ill_typed_fields_from_an_app_crash_neither_master_nor_balancer(hostile, port):
    master, balancer, worker = hostile
    try:   # the app's own request may die with the worker it compromised
        assert http_request(port)[::2] == (200, b"4\n")  # both crafted messages, on both channels
    except ConnectionError:
        pass
    # The master hears them on the worker's channel, the balancer on its link to it.
    # The master drops the channel of a worker that sent garbage and replaces it, often
    # before the app got to write on its balancer channel (the balancer's side of this
    # is tests/core/test_messages.py's: such a REPORT never decodes).
    master.wait_log(f"worker {worker} sent a bad message")
    assert "heartbeat message: requests" in master.log()
    master.wait_log("; replacing it")
    wait_for(lambda: not alive(worker), message="the lying worker to be gone")
    (replacement,) = master.wait_workers(1, exclude=(worker,))
    assert alive(master.pid) and alive(balancer) and master.balancer() == balancer
    wait_for(lambda: answers(port, "/?quiet"), message="the app answering again")


def test_a_hand_back_of_a_pipe_is_closed_and_the_balancer_carries_on(hostile, port):
    master, balancer, worker = hostile
    status, _, body = http_request(port, "/?send=fd")
    assert (status, body) == (200, b"2\n")  # one pipe on each channel
    master.wait_log("handed back something that is not a connection")
    # Only app code sends such a thing: the balancer drops that worker's link, the
    # worker hears it and stops, and the master replaces it.
    master.wait_log(f"worker {worker} handed back")
    master.wait_log("the balancer dropped this worker's link; stopping")
    wait_for(lambda: not alive(worker), message="the lying worker to be gone")
    master.wait_workers(1, exclude=(worker,))
    assert alive(master.pid) and alive(balancer) and master.balancer() == balancer
    wait_for(lambda: answers(port, "/?quiet"), message="the app answering again")
