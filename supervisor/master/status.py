"""What `baton ctl status` reports: the master's state as plain data.

Reads the master's bookkeeping and /proc; changes nothing.
"""
from __future__ import annotations

import os
import socket
import struct

from supervisor.system import listeners as listeners_mod

_TCP_INFO_UNACKED = 24  # offset of tcpi_unacked: for a listener, its accept queue length


def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, IndexError, ValueError):
        return None


def queue_depth(sock: socket.socket) -> int | None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        return struct.unpack_from("I", info, _TCP_INFO_UNACKED)[0]
    except OSError:
        return None


def status(master) -> dict:
    now = master.clock()
    apps = []
    for name, app in master.apps.items():
        workers = []
        for child in sorted(master.children.values(), key=lambda c: (c.record.generation, c.record.index)):
            record = child.record
            if record.app != name:
                continue
            workers.append({
                "pid": record.pid, "index": record.index, "generation": record.generation,
                "state": record.state.value, "requests": child.load.requests,
                "connections": child.load.connections, "busy": child.load.busy,
                "rss_kb": rss_kb(record.pid), "uptime_s": round(now - record.spawned_at, 1),
            })
        apps.append({"name": name, "generation": app.current.number, "target": app.target,
                     "user": app.current.identity.name, "workers": workers})
    listeners = []
    for name, listener in master.config.listeners.items():
        sock = master.sockets.get(name)
        listeners.append({"name": name, "address": str(listener.bind), "mode": listener.mode,
                          "queue": queue_depth(sock) if sock is not None else None,
                          "url": listeners_mod.describe(sock) if sock is not None else None})
    return {
        "ok": True,
        "master": {"pid": os.getpid(), "config": master.config.path, "uptime_s": round(now - master.started_at, 1),
                   "reloads": master.counters["reloads"],
                   "generation_switches": master.counters["generation_switches"]},
        "apps": apps,
        "listeners": listeners,
    }
