"""The master's figures for /metrics, as plain data (pure).

The master hears each worker's request figures (STATS, counted since that worker
started) and samples every child's CPU, memory and fds from /proc (`status.py` reads
them); balancer 0 renders what the master sends it (`balancer.health`, whose keys
these are). Promises:

* A counter never goes back when a worker is replaced: a gone worker's last figures
  are added to its app's base (`RequestTotals.keep_only`), a gone process's last CPU
  time to its role's (`ProcessTotals.observe`). Gauges (requests in flight, memory,
  fds) count the live ones only.
* `messages_for` splits the figures into METRICS messages of at most APPS_PER_MESSAGE
  apps each, so no number of apps outgrows a message.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from supervisor.ipc.messages import (
    REQUEST_DURATION_BOUNDS_S,
    STATUS_CLASSES,
    Metrics,
    Stats,
)

# A restart's reasons (supervision's): always listed, so a rate of each can be taken
# from the start.
RESTART_REASONS = ("boot_failure", "crash", "max_requests", "max_rss", "reload", "timeout")
APPS_PER_MESSAGE = 16   # ~40 figures an app of ~50 bytes each: well under a message's 64 KiB

_BUCKET_KEYS = tuple(f"baton_request_duration_seconds:{bound!r}" for bound in REQUEST_DURATION_BOUNDS_S) + (
    "baton_request_duration_seconds:+Inf",)
_CLASS_KEYS = tuple(f"baton_responses_total:{name}" for name in STATUS_CLASSES)


class _Counts:
    __slots__ = ("responses", "durations", "sum_s")

    def __init__(self) -> None:
        self.responses = [0] * len(STATUS_CLASSES)
        self.durations = [0] * len(_BUCKET_KEYS)
        self.sum_s = 0.0

    def add(self, stats: Stats) -> None:
        for index, count in enumerate(stats.responses):
            self.responses[index] += count
        for index, count in enumerate(stats.durations):
            self.durations[index] += count
        self.sum_s += stats.duration_sum_s


class RequestTotals:
    """Per app, the request figures of its workers, the gone ones' included."""

    def __init__(self) -> None:
        self.latest: dict[int, tuple[str, Stats]] = {}   # worker key -> (app, its last STATS)
        self.base: dict[str, _Counts] = {}               # app -> what its gone workers said last

    def update(self, key: int, app: str, stats: Stats) -> None:
        self.latest[key] = (app, stats)

    def keep_only(self, alive: Iterable[int], apps: Iterable[str]) -> None:
        """Fold the workers not in `alive` into their app's base; forget an app not in
        `apps` (removed by a reload) once none of its workers is left."""
        alive = set(alive)
        for key in [key for key in self.latest if key not in alive]:
            app, stats = self.latest.pop(key)
            self.base.setdefault(app, _Counts()).add(stats)
        reporting = {app for app, _ in self.latest.values()}
        for app in [app for app in self.base if app not in apps and app not in reporting]:
            del self.base[app]

    def per_app(self, apps: Iterable[str]) -> dict[str, dict[str, float]]:
        """Figures for `apps` (each listed, zeros included) and any app a worker still reports for."""
        totals: dict[str, _Counts] = {}
        in_flight: dict[str, int] = {}
        for app in apps:
            totals[app] = _Counts()
            in_flight[app] = 0
        for app, counts in self.base.items():
            total = totals.setdefault(app, _Counts())
            total.responses = [a + b for a, b in zip(total.responses, counts.responses)]
            total.durations = [a + b for a, b in zip(total.durations, counts.durations)]
            total.sum_s += counts.sum_s
        for app, stats in self.latest.values():
            totals.setdefault(app, _Counts()).add(stats)
            in_flight[app] = in_flight.get(app, 0) + stats.in_flight
        figures = {}
        for app, total in totals.items():
            entry = figures[app] = {"baton_requests_total": sum(total.responses),
                                    "baton_requests_in_flight": in_flight.get(app, 0),
                                    "baton_request_duration_seconds_sum": total.sum_s}
            entry.update(zip(_CLASS_KEYS, total.responses))
            entry.update(zip(_BUCKET_KEYS, total.durations))
        return figures


@dataclass(frozen=True)
class ProcessSample:
    """One process as /proc says: CPU time (user + system), resident memory, open fds
    (None when they could not be counted)."""
    cpu_s: float
    rss_bytes: int
    open_fds: int | None


class ProcessTotals:
    """Per role ("master", "balancer", "watcher", "worker", "template") and app (""
    but for workers and templates), the CPU, memory and fds of its processes, sampled
    now and then."""

    def __init__(self) -> None:
        self.latest: dict[tuple[int, str, str], ProcessSample] = {}   # (pid, role, app) -> sample
        self.base_cpu_s: dict[tuple[str, str], float] = {}           # (role, app) -> gone processes' CPU

    def observe(self, samples: Mapping[tuple[int, str, str], ProcessSample], apps: Iterable[str]) -> None:
        """The samples of every live process, by (pid, role, app); the processes sampled
        before and missing now are gone, and their last CPU time counts on (up to one
        sampling interval of it is never seen). A workers' app not in `apps` (removed)
        is forgotten once none of its processes is left."""
        for key, sample in self.latest.items():
            if key not in samples:
                group = key[1:]
                self.base_cpu_s[group] = self.base_cpu_s.get(group, 0.0) + sample.cpu_s
        self.latest = dict(samples)
        live = {key[1:] for key in samples}
        apps = set(apps)
        for group in [group for group in self.base_cpu_s if group[1] and group[1] not in apps and group not in live]:
            del self.base_cpu_s[group]

    def figures(self) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
        """(per app, overall): process_* figures keyed "NAME:ROLE"."""
        per_app: dict[str, dict[str, float]] = {}
        overall: dict[str, float] = {}

        def into(role: str, app: str) -> dict[str, float]:
            return per_app.setdefault(app, {}) if app else overall

        for (role, app), cpu_s in self.base_cpu_s.items():
            entry = into(role, app)
            key = f"process_cpu_seconds_total:{role}"
            entry[key] = entry.get(key, 0.0) + cpu_s
        for (_, role, app), sample in self.latest.items():
            entry = into(role, app)
            for name, value in (("process_cpu_seconds_total", sample.cpu_s),
                                ("process_resident_memory_bytes", sample.rss_bytes),
                                ("process_open_fds", sample.open_fds)):
                if value is not None:
                    key = f"{name}:{role}"
                    entry[key] = entry.get(key, 0) + value
        return per_app, overall


def restart_figures(reasons: Mapping[str, int]) -> dict[str, float]:
    """An app's restarts by reason, every known reason listed."""
    figures = {f"baton_worker_restarts_total:{reason}": 0 for reason in RESTART_REASONS}
    for reason, count in reasons.items():
        figures[f"baton_worker_restarts_total:{reason}"] = count
    return figures


def merge(into: dict[str, dict[str, float]], more: Mapping[str, Mapping[str, float]]) -> None:
    """Add `more`'s per-app figures to `into`'s (a figure both have is summed)."""
    for app, figures in more.items():
        entry = into.setdefault(app, {})
        for name, value in figures.items():
            entry[name] = entry.get(name, 0) + value


def messages_for(apps: Mapping[str, Mapping[str, float]], overall: Mapping[str, float],
                 per_message: int = APPS_PER_MESSAGE) -> list[Metrics]:
    """The METRICS messages that carry these figures: all but the last say `more`."""
    names = sorted(apps)
    chunks = [names[start:start + per_message] for start in range(0, len(names), per_message)] or [[]]
    return [Metrics(apps={name: dict(apps[name]) for name in chunk}, overall=dict(overall) if last else {},
                    more=not last)
            for index, chunk in enumerate(chunks) for last in (index == len(chunks) - 1,)]
