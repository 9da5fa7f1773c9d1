"""/metrics as an operator scrapes it, from real masters in `balance` and `share` mode:
every scrape parsed by prometheus_client's parser, histograms checked whole, responses
counted by class within a second of the last one, counters kept across a worker's
replacement, restarts counted by reason, and process_* figures for every role."""
from __future__ import annotations

import math
import os
import platform
import signal
import threading
import time

import pytest
from conftest import REPO, cmdline, free_port, http_request, wait_for
from prometheus_client.parser import text_string_to_metric_families

from supervisor import __version__

CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class Scrape:
    """One /metrics answer, parsed: samples by (name, labels as a frozenset)."""

    def __init__(self, text: str):
        self.text = text
        self.families = {family.name: family for family in text_string_to_metric_families(text)}
        self.samples = {(sample.name, frozenset(sample.labels.items())): sample.value
                        for family in self.families.values() for sample in family.samples}
        for family in self.families.values():
            if family.type == "histogram":
                _check_histogram(family)

    def value(self, name: str, **labels) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def responses(self, app: str) -> dict[str, float | None]:
        return {name: self.value("baton_responses_total", app=app, **{"class": name}) for name in CLASSES}


def _check_histogram(family) -> None:
    """Buckets that never go down, end at +Inf, and agree with _count."""
    series: dict[frozenset, dict] = {}
    for sample in family.samples:
        labels = {k: v for k, v in sample.labels.items() if k != "le"}
        entry = series.setdefault(frozenset(labels.items()), {"buckets": []})
        if sample.name.endswith("_bucket"):
            entry["buckets"].append((float(sample.labels["le"]), sample.value))
        else:
            entry[sample.name.rsplit("_", 1)[1]] = sample.value
    for labels, entry in series.items():
        buckets = entry["buckets"]
        assert buckets == sorted(buckets), f"{family.name} {dict(labels)}: buckets out of order"
        counts = [count for _, count in buckets]
        assert counts == sorted(counts), f"{family.name} {dict(labels)}: a bucket counts less than the one before"
        assert buckets[-1][0] == math.inf and buckets[-1][1] == entry["count"], f"{family.name} {dict(labels)}"
        assert entry["sum"] >= 0


def scrape(health: int) -> Scrape:
    status, headers, body = http_request(health, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return Scrape(body.decode())


def metrics_config(port: int, health: int, mode: str, extra: str = "") -> str:
    return f"""
        [master]
        graceful_timeout = 5
        health = "127.0.0.1:{health}"

        [listeners.web]
        bind = "127.0.0.1:{port}"
        mode = "{mode}"

        [apps.metered]
        module = "tests.apps.metered:app"
        listeners = ["web"]
        chdir = "{REPO}"
        workers = 2
        {extra}
    """


@pytest.mark.parametrize("mode", ["balance", "share"])
def test_responses_durations_and_in_flight_are_counted_within_a_second(baton, port, scratch, mode):
    health = free_port()
    master = baton(metrics_config(port, health, mode))
    master.wait_workers(2)
    # The master's figures reach the balancer with its first push (within a second).
    start = wait_for(lambda: (lambda s: s if s.value("baton_workers", app="metered") == 2 else None)(scrape(health)),
                     message="the master's first figures")
    assert start.responses("metered") == dict.fromkeys(CLASSES, 0)
    assert start.value("baton_requests_in_flight", app="metered") == 0

    mark = scratch / "slow"
    slow = threading.Thread(target=lambda: http_request(port, f"/status/200?sleep=0.5&mark={mark}"))
    slow.start()
    wait_for(mark.exists, message="the slow request to run")
    wait_for(lambda: scrape(health).value("baton_requests_in_flight", app="metered") == 1,
             message="the slow request in flight")
    for status in (200, 200, 404, 200, 500, 404, 200, 404, 500):
        assert http_request(port, f"/status/{status}")[0] == status
    slow.join(10)
    last_response = time.monotonic()
    expected = {"1xx": 0, "2xx": 5, "3xx": 0, "4xx": 3, "5xx": 2}

    def settled():
        metrics = scrape(health)
        done = (metrics.responses("metered") == expected
                and metrics.value("baton_requests_in_flight", app="metered") == 0)
        return metrics if done else None
    # The figures travel worker -> master -> balancer at most every 50 ms each.
    metrics = wait_for(settled, timeout=max(0.0, last_response + 1.0 - time.monotonic()),
                       message=lambda: f"every response counted within 1 s:\n{scrape(health).text}")
    assert metrics.value("baton_requests_total", app="metered") == 10
    assert metrics.value("baton_request_duration_seconds_count", app="metered") == 10
    assert metrics.value("baton_request_duration_seconds_bucket", app="metered", le="+Inf") == 10
    # The slow one took at least its 0.5 s sleep.
    assert metrics.value("baton_request_duration_seconds_sum", app="metered") >= 0.5
    assert metrics.value("baton_request_duration_seconds_bucket", app="metered", le="0.25") <= 9
    assert metrics.value("baton_build_info", version=__version__, python=platform.python_version()) == 1

    roles = {"master", "balancer", "watcher"}
    for role in roles:
        assert metrics.value("process_resident_memory_bytes", role=role) > 0, role
        assert metrics.value("process_open_fds", role=role) > 0, role
        assert metrics.value("process_cpu_seconds_total", role=role) >= 0, role
    assert metrics.value("process_resident_memory_bytes", role="worker", app="metered") > 0
    assert metrics.value("process_open_fds", role="worker", app="metered") > 0
    assert metrics.value("process_cpu_seconds_total", role="worker", app="metered") > 0


def restart_config(port: int, port2: int, health: int) -> str:
    return metrics_config(port, health, "balance") + f"""
        [listeners.other]
        bind = "127.0.0.1:{port2}"

        [apps.recycled]
        module = "tests.apps.metered:app"
        listeners = ["other"]
        chdir = "{REPO}"
        max_requests = 3
        timeout = 1
    """


@pytest.mark.timeout(90)
def test_restarts_by_reason_and_counters_that_outlive_their_workers(baton, port, scratch):
    health, port2 = free_port(), free_port()
    master = baton(restart_config(port, port2, health))
    first = master.wait_workers(3)
    victims = [pid for pid in first if "worker metered#" in cmdline(pid)]
    recycled = [pid for pid in first if "worker recycled#" in cmdline(pid)]
    scrapes: list[Scrape] = []

    def metrics() -> Scrape:
        scrapes.append(scrape(health))
        return scrapes[-1]

    def restarts(app: str, reason: str) -> float | None:
        return metrics().value("baton_worker_restarts_total", app=app, reason=reason)

    wait_for(lambda: restarts("recycled", "crash") is not None, message="the master's first figures")
    assert all(restarts(app, reason) == 0 for app in ("metered", "recycled")
               for reason in ("crash", "timeout", "max_requests", "reload"))
    for status in (200, 404, 200):
        assert http_request(port, f"/status/{status}")[0] == status
    wait_for(lambda: metrics().value("baton_requests_total", app="metered") == 3, message="metered's responses")

    # Crashes: the dead workers' responses stay counted.
    assert len(victims) == 2
    for victim in victims:
        os.kill(victim, signal.SIGKILL)
    wait_for(lambda: restarts("metered", "crash") == 2, message="the crashes counted")
    master.wait_workers(3, exclude=victims)
    after_crash = metrics()
    assert after_crash.value("baton_requests_total", app="metered") == 3
    assert after_crash.responses("metered") == {"1xx": 0, "2xx": 2, "3xx": 0, "4xx": 1, "5xx": 0}

    # max_requests: the third request recycles the worker.
    for _ in range(3):
        assert http_request(port2, "/status/200")[0] == 200
    wait_for(lambda: restarts("recycled", "max_requests") == 1, message="the recycling counted")
    master.wait_workers(3, exclude=recycled)   # the request below must reach its replacement

    # timeout: a request past `timeout` gets its worker aborted and replaced.
    mark = scratch / "hung"
    threading.Thread(target=lambda: _ignore_errors(http_request, port2, f"/?sleep=30&mark={mark}"),
                     daemon=True).start()
    wait_for(mark.exists, message="the hung request to run")
    wait_for(lambda: restarts("recycled", "timeout") == 1, timeout=15,
             message=lambda: f"the timeout counted:\n{master.log()}")

    # (Its replacement serving: one still booting is not counted as replaced by a reload.)
    wait_for(lambda: metrics().value("baton_workers", app="recycled") == 1, message="the replacement to serve")

    # reload: every serving worker is replaced by the new generation.
    master.signal(signal.SIGHUP)
    wait_for(lambda: restarts("metered", "reload") == 2 and restarts("recycled", "reload") == 1,
             timeout=20, message=lambda: f"the reload counted:\n{master.log()}")
    final = metrics()
    assert final.value("baton_requests_total", app="metered") == 3   # through crashes and a reload
    assert final.value("baton_worker_restarts_total", app="metered", reason="crash") == 2
    assert final.value("baton_reloads_total") == 1
    # (None in the scrapes before the master's first sampling of /proc.)
    cpu = [value for s in scrapes if (value := s.value("process_cpu_seconds_total", role="worker", app="metered"))
           is not None]
    assert cpu
    assert cpu == sorted(cpu), "the workers' CPU time went back when one was replaced"


def _ignore_errors(function, *args) -> None:
    try:
        function(*args)
    except OSError:
        pass
