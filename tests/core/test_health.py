"""The /metrics renderer (supervisor.balancer.health.render), case by case: figures in,
Prometheus text out, exactly; and every output parsed back by prometheus_client."""
from __future__ import annotations

import socket
import textwrap

import pytest
from prometheus_client.parser import text_string_to_metric_families

from supervisor.balancer import health
from supervisor.balancer.healthserver import HealthServer
from supervisor.system.loop import Loop


def text(block: str) -> str:
    return textwrap.dedent(block).lstrip("\n")


HELP_REQUESTS = ("# HELP baton_requests_total Requests answered by the app's workers (by the app, or by Baton "
                 "for a bad or late request).\n# TYPE baton_requests_total counter\n")

CASES = [
    # (name, per_app, overall, build, expected text)
    ("nothing at all", {}, {}, None, "\n"),
    ("a plain per-app counter, apps in order, overall last",
     {"b": {"baton_requests_total": 2}, "a": {"baton_requests_total": 1.0}}, {}, None,
     HELP_REQUESTS + 'baton_requests_total{app="a"} 1\nbaton_requests_total{app="b"} 2\n'),
    ("a labelled family: one sample per label value, sorted",
     {"a": {"baton_worker_restarts_total:timeout": 1, "baton_worker_restarts_total:crash": 2}}, {}, None,
     text('''
         # HELP baton_worker_restarts_total Workers replaced, by reason.
         # TYPE baton_worker_restarts_total counter
         baton_worker_restarts_total{app="a",reason="crash"} 2
         baton_worker_restarts_total{app="a",reason="timeout"} 1
     ''')),
    ("a histogram: buckets made cumulative in bound order, +Inf is the count",
     {"a": {"baton_request_duration_seconds:1.0": 1, "baton_request_duration_seconds:0.1": 2,
            "baton_request_duration_seconds:+Inf": 1, "baton_request_duration_seconds_sum": 12.25}}, {}, None,
     text('''
         # HELP baton_request_duration_seconds Time from a request's head complete to its response done, in the worker.
         # TYPE baton_request_duration_seconds histogram
         baton_request_duration_seconds_bucket{app="a",le="0.1"} 2
         baton_request_duration_seconds_bucket{app="a",le="1.0"} 3
         baton_request_duration_seconds_bucket{app="a",le="+Inf"} 4
         baton_request_duration_seconds_sum{app="a"} 12.25
         baton_request_duration_seconds_count{app="a"} 4
     ''')),
    ("a histogram with a sum and no bucket yet still has +Inf",
     {"a": {"baton_request_duration_seconds_sum": 0}}, {}, None,
     text('''
         # HELP baton_request_duration_seconds Time from a request's head complete to its response done, in the worker.
         # TYPE baton_request_duration_seconds histogram
         baton_request_duration_seconds_bucket{app="a",le="+Inf"} 0
         baton_request_duration_seconds_sum{app="a"} 0
         baton_request_duration_seconds_count{app="a"} 0
     ''')),
    ("a summary", {"a": {"baton_queue_wait_seconds_sum": 0.5, "baton_queue_wait_seconds_count": 3}}, {}, None,
     text('''
         # HELP baton_queue_wait_seconds Time the connections handed off had waited in the balancer's queue.
         # TYPE baton_queue_wait_seconds summary
         baton_queue_wait_seconds_sum{app="a"} 0.5
         baton_queue_wait_seconds_count{app="a"} 3
     ''')),
    ("process figures: per app with app and role, overall with role only",
     {"a": {"process_open_fds:worker": 12}}, {"process_open_fds:master": 9, "process_open_fds:balancer": 7}, None,
     text('''
         # HELP process_open_fds Open file descriptors of Baton's processes, by role.
         # TYPE process_open_fds gauge
         process_open_fds{app="a",role="worker"} 12
         process_open_fds{role="balancer"} 7
         process_open_fds{role="master"} 9
     ''')),
    ("build info comes first, labels sorted", {}, {}, {"version": "1.2", "python": "3.11.2"},
     text('''
         # HELP baton_build_info Baton's version and the Python it runs on.
         # TYPE baton_build_info gauge
         baton_build_info{python="3.11.2",version="1.2"} 1
     ''')),
    ("label values are escaped", {'we"ird\\app\n': {"baton_workers": 1}}, {}, None,
     text('''
         # HELP baton_workers Worker processes serving the app.
         # TYPE baton_workers gauge
         baton_workers{app="we\\"ird\\\\app\\n"} 1
     ''')),
    ("figures of no known family are left out", {"a": {"baton_nonsense": 1, "nonsense:x": 2}}, {"x": 1}, None,
     "\n"),
]


@pytest.mark.parametrize("per_app,overall,build,expected", [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_render(per_app, overall, build, expected):
    rendered = health.render(per_app, overall, build=build)
    assert rendered == expected
    list(text_string_to_metric_families(rendered))   # parses


def test_every_family_follows_the_naming_conventions():
    for name, (kind, help_text, _) in health.METRICS.items():
        assert name.startswith(("baton_", "process_")) and help_text
        assert name.endswith("_total") == (kind == "counter"), name
        assert kind in ("counter", "gauge", "histogram", "summary")


def test_a_metrics_answer_larger_than_the_socket_takes_at_once_arrives_whole():
    """The answer goes out as the client reads: none is cut at a socket buffer."""
    big = "x" * 2_000_000
    loop = Loop()
    listening = socket.create_server(("127.0.0.1", 0))
    server = HealthServer(loop, listening, lambda: False, lambda: big)
    client = socket.create_connection(listening.getsockname())
    try:
        client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        client.setblocking(False)
        received = bytearray()
        while not received.endswith(b"x" * 10) or len(received) < len(big):
            loop.run_once(0.01)
            try:
                chunk = client.recv(1 << 20)
            except BlockingIOError:
                continue
            if not chunk:
                break
            received += chunk
        assert received.endswith(big.encode()) and b"Content-Length: 2000000" in received
        assert not server.clients   # answered whole, then closed
    finally:
        client.close()
        server.close()
        loop.close()
