"""The health endpoint's answers (pure): `/healthz` and Prometheus `/metrics`.

Served by the balancer, never by app workers, so a wedged app cannot hide from the
load balancer in front and a hostile request never reaches the master. The requests
are tiny and answered whole; anything unexpected is refused.
"""
from __future__ import annotations

from collections.abc import Callable

MAX_HEAD = 4096

_STATUS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           503: "Service Unavailable"}


def answer(head: bytes, *, draining: bool, metrics: Callable[[], str]) -> bytes | None:
    """The whole response to one request head, or None while the head is incomplete.
    `metrics` renders the /metrics body; it is called only when that is asked for."""
    end = head.find(b"\r\n\r\n")
    if end < 0:
        return _response(400, "request head too large\n") if len(head) > MAX_HEAD else None
    request_line = head[:head.find(b"\r\n")]
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return _response(400, "bad request\n")
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        return _response(405, "only GET and HEAD\n")
    if target == b"/healthz":
        body = _response(503, "draining\n") if draining else _response(200, "ok\n")
    elif target == b"/metrics":
        body = _response(200, metrics(), "text/plain; version=0.0.4; charset=utf-8")
    else:
        body = _response(404, "try /healthz or /metrics\n")
    if method == b"HEAD":
        return body[:body.find(b"\r\n\r\n") + 4]
    return body


def _response(status: int, text: str, content_type: str = "text/plain; charset=utf-8") -> bytes:
    payload = text.encode()
    return (f"HTTP/1.1 {status} {_STATUS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload


# name -> (type, help); every metric Baton exports, in the order they are written.
METRICS = {
    "baton_requests_total": ("counter", "Requests served by the app's workers."),
    "baton_workers": ("gauge", "Worker processes serving the app."),
    "baton_worker_restarts_total": ("counter", "Workers replaced after dying."),
    "baton_connections": ("gauge", "Connections the app's workers hold now."),
    "baton_handoffs_total": ("counter", "Connections the balancer passed to the app's workers."),
    "baton_handbacks_total": ("counter", "Idle keep-alive connections handed from a retiring worker to another."),
    "baton_parks_total": ("counter", "Idle keep-alive connections the app's workers parked in the balancer."),
    "baton_parked": ("gauge", "Idle keep-alive connections the balancer watches for their next request."),
    "baton_queue_depth": ("gauge", "Connections waiting in the balancer for a worker of the app."),
    "baton_queue_wait_seconds_total": ("counter", "Time connections spent waiting in the balancer's queue."),
    "baton_reloads_total": ("counter", "Configuration reloads applied."),
    "baton_accepted_total": ("counter", "Connections the balancer accepted."),
    "baton_refused_total": ("counter", "Connections the balancer answered itself (unknown host, overflow, timeout)."),
}


def render(per_app: dict[str, dict[str, float]], overall: dict[str, float]) -> str:
    """Prometheus text format: per-app samples carry an `app` label."""
    lines = []
    for name, (kind, help_text) in METRICS.items():
        samples = [(f'{{app="{_escape(app)}"}}', values[name]) for app, values in sorted(per_app.items())
                   if name in values]
        if name in overall:
            samples.append(("", overall[name]))
        if not samples:
            continue
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
