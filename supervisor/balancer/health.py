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


# name -> (type, help, label): every family Baton exports, in the order they are
# written. The figures (per app, and overall) are keyed:
#   NAME          a family without a label of its own;
#   NAME:VALUE    one with its label set to VALUE (`class`, `reason`, `role`);
#   NAME:LE       a histogram's count in the bucket whose bound is LE ("0.25", "+Inf"),
#                 not cumulative (figures from several processes add up), with NAME_sum;
#   NAME_sum, NAME_count   a summary's.
METRICS = {
    "baton_requests_total": ("counter", "Requests answered by the app's workers (by the app, or by Baton for a "
                                        "bad or late request).", None),
    "baton_responses_total": ("counter", "Responses of the app's workers, by status class.", "class"),
    "baton_request_duration_seconds": ("histogram", "Time from a request's head complete to its response done, "
                                                    "in the worker.", "le"),
    "baton_requests_in_flight": ("gauge", "Requests the app's workers are running now.", None),
    "baton_workers": ("gauge", "Worker processes serving the app.", None),
    "baton_worker_restarts_total": ("counter", "Workers replaced, by reason.", "reason"),
    "baton_connections": ("gauge", "Connections the app's workers hold now (from the balancer).", None),
    "baton_handoffs_total": ("counter", "Connections the balancer passed to the app's workers.", None),
    "baton_handbacks_total": ("counter", "Idle keep-alive connections handed from a retiring worker to another.",
                              None),
    "baton_parks_total": ("counter", "Idle keep-alive connections the app's workers parked in the balancer.", None),
    "baton_parked": ("gauge", "Idle keep-alive connections the balancer watches for their next request.", None),
    "baton_queue_depth": ("gauge", "Connections waiting in the balancer for a worker of the app.", None),
    "baton_queue_wait_seconds": ("summary", "Time the connections handed off had waited in the balancer's queue.",
                                 None),
    "baton_reloads_total": ("counter", "Configuration reloads applied.", None),
    "baton_accepted_total": ("counter", "Connections the balancer accepted.", None),
    "baton_taken_back_total": ("counter", "Connections taken back unread from a silent worker for a free one.",
                               None),
    "baton_refused_total": ("counter", "Connections the balancer answered itself (unknown host, overflow, timeout).",
                            None),
    "process_cpu_seconds_total": ("counter", "User and system CPU time of Baton's processes, by role "
                                             "(a replaced process's included).", "role"),
    "process_resident_memory_bytes": ("gauge", "Resident memory of Baton's processes, by role.", "role"),
    "process_open_fds": ("gauge", "Open file descriptors of Baton's processes, by role.", "role"),
}
_INF = float("inf")


def render(per_app: dict[str, dict[str, float]], overall: dict[str, float],
           build: dict[str, str] | None = None) -> str:
    """Prometheus text format (0.0.4): per-app samples carry an `app` label; `build`
    gives `baton_build_info`'s labels. Figures whose family is not in METRICS are left
    out; a family with no figure is left out whole."""
    lines = []
    if build is not None:
        lines += ["# HELP baton_build_info Baton's version and the Python it runs on.",
                  "# TYPE baton_build_info gauge",
                  f"baton_build_info{_labels(sorted(build.items()))} 1"]
    sources = [([("app", app)], figures) for app, figures in sorted(per_app.items())] + [([], overall)]
    for name, (kind, help_text, label) in METRICS.items():
        samples: list[str] = []
        for labels, figures in sources:
            if kind == "histogram":
                samples += _histogram(name, labels, figures)
            elif kind == "summary":
                samples += [f"{name}{suffix}{_labels(labels)} {_number(figures[name + suffix])}"
                            for suffix in ("_sum", "_count") if name + suffix in figures]
            elif label is None:
                if name in figures:
                    samples.append(f"{name}{_labels(labels)} {_number(figures[name])}")
            else:
                prefix = name + ":"
                samples += [f"{name}{_labels([*labels, (label, key[len(prefix):])])} {_number(value)}"
                            for key, value in sorted(figures.items()) if key.startswith(prefix)]
        if samples:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]
    return "\n".join(lines) + "\n"


def _histogram(name: str, labels: list[tuple[str, str]], figures: dict[str, float]) -> list[str]:
    """Cumulative buckets in ascending order, +Inf always (it is the count), then sum and count."""
    prefix = name + ":"
    buckets = sorted((_bound(key[len(prefix):]), key[len(prefix):], value)
                     for key, value in figures.items() if key.startswith(prefix))
    if not buckets and name + "_sum" not in figures:
        return []
    lines, total = [], 0
    for bound, text, value in buckets:
        total += value
        if bound != _INF:
            lines.append(f"{name}_bucket{_labels([*labels, ('le', text)])} {_number(total)}")
    lines.append(f"{name}_bucket{_labels([*labels, ('le', '+Inf')])} {_number(total)}")
    lines.append(f"{name}_sum{_labels(labels)} {_number(figures.get(name + '_sum', 0))}")
    lines.append(f"{name}_count{_labels(labels)} {_number(total)}")
    return lines


def _bound(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return _INF


def _labels(pairs) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in pairs) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
