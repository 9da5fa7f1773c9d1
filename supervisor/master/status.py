"""What `baton ctl status` reports: the master's state as plain data (with each
worker's and each preloaded app's template's memory: RSS, PSS, private dirty).

Reads the master's bookkeeping and /proc; changes nothing.
"""
from __future__ import annotations

import os
import socket
import struct

from supervisor.master.figures import ProcessSample
from supervisor.system import listeners as listeners_mod

_TCP_INFO_UNACKED = 24  # offset of tcpi_unacked: for a listener, its accept queue length


def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, IndexError, ValueError):
        return None


def process_sample(pid: int) -> ProcessSample | None:
    """Process `pid`'s CPU time, resident memory and open fds, from /proc; None if it
    is gone. Its fds need the right to list /proc/PID/fd (the same user, or root with
    CAP_DAC_READ_SEARCH or CAP_DAC_OVERRIDE): without it they are None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()   # the name, in parentheses, may hold anything
        with open(f"/proc/{pid}/statm", "rb") as f:
            rss_pages = int(f.read().split()[1])
        # utime and stime are fields 14 and 15 of stat(5); 3 is the first after the name.
        cpu_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None
    try:
        # Listing our own fds opens one more: that one is not counted.
        open_fds: int | None = len(os.listdir(f"/proc/{pid}/fd")) - (pid == os.getpid())
    except OSError:
        open_fds = None
    return ProcessSample(cpu_s, rss_pages * os.sysconf("SC_PAGE_SIZE"), open_fds)


def memory_kb(pid: int) -> dict[str, int | None]:
    """Process `pid`'s proportional set size (its private pages plus its share of each
    shared one) and its private dirty pages, in KiB, from /proc/PID/smaps_rollup: what
    shows that preloaded workers share their template's memory. None when unreadable."""
    found: dict[str, int | None] = {"pss_kb": None, "private_dirty_kb": None}
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    found["pss_kb"] = int(line.split()[1])
                elif line.startswith(b"Private_Dirty:"):
                    found["private_dirty_kb"] = int(line.split()[1])
    except (OSError, IndexError, ValueError):
        pass
    return found


def queue_depth(sock: socket.socket) -> int | None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        return struct.unpack_from("I", info, _TCP_INFO_UNACKED)[0]
    except OSError:
        return None


def report(master) -> dict:
    """What `baton ctl status` shows: the master, every app with its workers (from the
    supervision core's records), every listener, every balancer (pid None while one is
    being replaced)."""
    now = master.clock()
    apps = []
    for name, app in master.core.apps.items():
        workers = []
        records = sorted((w for w in master.core.workers.values() if w.app == name),
                         key=lambda w: (w.generation, w.index, w.key))
        for record in records:
            workers.append({
                "pid": record.pid, "index": record.index, "generation": record.generation,
                "state": record.state.value, "requests": record.load.requests,
                "connections": record.load.connections, "busy": record.load.busy,
                "rss_kb": rss_kb(record.pid) if record.pid else None,
                **(memory_kb(record.pid) if record.pid else {"pss_kb": None, "private_dirty_kb": None}),
                "uptime_s": round(now - (record.spawned_at or record.created_at), 1),
            })
        templates = [{"pid": t.pid, "generation": t.generation, "state": t.state,
                      "rss_kb": rss_kb(t.pid) if t.pid else None,
                      **(memory_kb(t.pid) if t.pid else {"pss_kb": None, "private_dirty_kb": None}),
                      "uptime_s": round(now - t.started_at, 1)}
                     for (owner, _), t in sorted(master.core.templates.items()) if owner == name]
        attached = [{"key": w.key, "pid": w.pid, "uid": w.uid, "gid": w.gid, "tag": w.tag, "state": w.state,
                     "requests": w.requests, "connections": w.connections,
                     "uptime_s": round(now - w.joined_at, 1)}
                    for w in sorted(master.attached.registry.of_app(name), key=lambda w: w.key)]
        live = master.attached.registry.apps.get(name)
        apps.append({"name": name, "generation": app.current.number, "target": app.target,
                     "user": app.current.identity.name, "workers": workers, "templates": templates,
                     "attached": attached, "live_tag": live.live if live is not None else None})
    listeners = []
    for name, listener in master.config.listeners.items():
        sock = master.sockets.listening.get(name)
        listeners.append({"name": name, "address": str(listener.bind), "mode": listener.mode,
                          "queue": queue_depth(sock) if sock is not None else None,
                          "url": listeners_mod.describe(sock) if sock is not None else None})
    balancers = []
    for handle in master.balancers.handles:
        record = master.core.sidecars.get(handle.name)
        running = handle.pid is not None and record is not None and record.running
        balancers.append({"index": handle.index, "name": handle.name, "pid": handle.pid,
                          "accepted": handle.accepted if running else None,
                          "uptime_s": round(now - record.started_at, 1) if running else None})
    return {
        "ok": True,
        "master": {"pid": os.getpid(), "config": master.config.path, "uptime_s": round(now - master.started_at, 1),
                   "reloads": master.counters["reloads"],
                   "generation_switches": master.core.counters["generation_switches"]},
        "apps": apps,
        "listeners": listeners,
        "balancers": balancers,
    }
