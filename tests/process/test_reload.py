"""Zero-downtime reloads as real processes: clients keep their connections and lose nothing."""
from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, get_json, pidfd_count, wait_for


def reload_config(port, value, workers=2, mode="balance", module="tests.apps.probe:app", extra=""):
    return f"""
        [master]
        graceful_timeout = 10
        boot_timeout = 10

        [listeners.web]
        bind = "127.0.0.1:{port}"
        mode = "{mode}"

        [apps.probe]
        module = "{module}"
        listeners = ["web"]
        workers = {workers}
        keepalive = 60
        chdir = "{REPO}"
        env = {{ PROBE_VALUE = "{value}" }}
        {extra}
    """


class KeepAliveClient(threading.Thread):
    """Sends requests back to back on one keep-alive connection until told to stop.

    Any error, any non-200 and any connection the server closes is counted: a
    zero-downtime reload must leave every one of those counts at zero.
    """

    def __init__(self, port: int, seen: dict):
        super().__init__(daemon=True)
        self.port = port
        self.seen = seen
        self.stop = threading.Event()
        self.requests = 0
        self.failures: list[str] = []
        self.server_closed = 0
        self.pids: set[int] = set()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        while not self.stop.is_set():
            try:
                conn.request("GET", "/")
                response = conn.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(repr(exc))
                self.server_closed += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
                continue
            if response.status != 200:
                self.failures.append(f"status {response.status}: {body[:200]!r}")
                continue
            if response.will_close:
                self.server_closed += 1
            info = json.loads(body)
            self.pids.add(info["pid"])
            self.seen.setdefault(info["env"], time.monotonic())
            self.requests += 1
        conn.close()


class Clients:
    def __init__(self, port: int, count: int = 16):
        self.seen: dict[str, float] = {}
        self.threads = [KeepAliveClient(port, self.seen) for _ in range(count)]

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        wait_for(lambda: all(t.requests for t in self.threads), message="every client to get an answer")
        return self

    def __exit__(self, *exc):
        for thread in self.threads:
            thread.stop.set()
        for thread in self.threads:
            thread.join(20)

    def wait_value(self, value: str, saved_at: float) -> float:
        wait_for(lambda: value in self.seen, timeout=15, message=f"value {value!r} to be served")
        return self.seen[value] - saved_at

    def assert_nothing_lost(self) -> None:
        failures = [f for t in self.threads for f in t.failures]
        assert failures == []
        assert sum(t.server_closed for t in self.threads) == 0
        assert all(t.requests > 0 for t in self.threads)


def save(path: Path, text: str, by_rename: bool) -> float:
    """Save like an editor: in place, or a new file renamed over the old one."""
    if by_rename:
        temp = path.with_name(path.name + ".swp")
        temp.write_text(text)
        os.replace(temp, path)
    else:
        with open(path, "r+") as f:
            f.truncate(0)
            f.write(text)
    return time.monotonic()


def _dedent(text: str) -> str:
    import textwrap
    return textwrap.dedent(text)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["balance", "share"])
def test_twenty_config_edits_under_keep_alive_load_lose_nothing(baton, port, mode):
    master = baton(reload_config(port, "v0", mode=mode))
    master.wait_workers(2)
    master.wait_log("is watching for changes")
    latencies = []
    with Clients(port) as clients:
        for n in range(1, 21):
            workers = 2 + n % 2
            saved_at = save(master.config, _dedent(reload_config(port, f"v{n}", workers=workers, mode=mode)),
                            by_rename=n % 2 == 0)
            latencies.append(clients.wait_value(f"v{n}", saved_at))
            master.wait_log(f"generation {n + 1} serving")
    clients.assert_nothing_lost()
    print(f"\nsave -> new value served ({mode}): max {max(latencies) * 1000:.0f} ms, "
          f"mean {sum(latencies) / len(latencies) * 1000:.0f} ms")


@pytest.mark.timeout(180)
def test_twenty_sighups_under_keep_alive_load_lose_nothing(baton, port):
    master = baton(reload_config(port, "v0"))
    master.wait_workers(2)
    with Clients(port) as clients:
        for n in range(1, 21):
            master.signal(signal.SIGHUP)
            master.wait_log(f"generation {n + 1} serving")
            new_pids = set(master.wait_workers(2))
            wait_for(lambda: any(t.pids & new_pids for t in clients.threads),
                     message=f"generation {n + 1} to answer")
    clients.assert_nothing_lost()


def test_a_config_with_a_syntax_error_is_rejected_and_nothing_changes(baton, port):
    master = baton(reload_config(port, "v0"))
    before = set(master.wait_workers(2))
    master.wait_log("is watching for changes")
    with Clients(port, count=4) as clients:
        save(master.config, "[apps.probe\nworkers = 3\n", by_rename=False)
        master.wait_log("reload rejected; the running config stays")
        assert "invalid TOML" in master.log()
        assert set(master.workers()) == before
        assert get_json(port)["env"] == "v0"
    clients.assert_nothing_lost()


def test_an_app_that_fails_at_import_is_rolled_back(baton, port):
    master = baton(reload_config(port, "v0"))
    before = set(master.wait_workers(2))
    master.wait_log("is watching for changes")
    with Clients(port, count=4) as clients:
        save(master.config, _dedent(reload_config(port, "v1", module="tests.apps.broken:app")), by_rename=True)
        master.wait_log("generation 2 dropped")
        assert "RuntimeError: broken on purpose" in master.log()
        wait_for(lambda: set(master.workers()) == before,
                 message=lambda: f"the failed generation to be gone; workers {master.workers()}, log:\n{master.log()}")
        assert get_json(port)["env"] == "v0"
    clients.assert_nothing_lost()


def test_an_app_that_hangs_at_import_is_dropped_at_its_boot_timeout_while_the_old_one_serves(baton, port):
    # The first generation boots under the usual timeout (an exec'd worker's start is
    # not instant on a loaded machine); only the hanging one is held to a short one.
    master = baton(reload_config(port, "v0"))
    before = set(master.wait_workers(2))
    master.wait_log("is watching for changes")
    with Clients(port, count=4) as clients:
        save(master.config, _dedent(reload_config(port, "v1", module="tests.apps.hangs:app")
                                    .replace("boot_timeout = 10", "boot_timeout = 3")), by_rename=True)
        master.wait_log("did not boot within 3s")
        master.wait_log("generation 2 dropped")
        wait_for(lambda: set(master.workers()) == before,
                 message=lambda: f"the hung generation to be killed; workers {master.workers()}, log:\n{master.log()}")
        assert get_json(port)["env"] == "v0"
    clients.assert_nothing_lost()


def _fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.mark.timeout(300)
def test_two_hundred_reloads_leak_no_fds_memory_or_zombies(baton, port):
    master = baton(reload_config(port, "v0", workers=1))
    master.wait_workers(1)
    balancer = master.balancer()
    watched = pidfd_count(master.pid)   # its balancer, watcher and one worker

    def drained():
        # Gone from /proc is not enough: the master reaps, and the balancer unlinks, a
        # moment later (each then closes that worker's fds, its pidfd among them).
        return len(master.workers()) == 1 and pidfd_count(master.pid) == watched and pidfd_count(balancer) == 1
    for n in range(1, 11):  # warm up: caches, lazily imported modules
        master.signal(signal.SIGHUP)
        master.wait_log(f"generation {n + 1} serving")
    wait_for(drained, message="the warm-up generations to drain")
    fds = (_fd_count(master.pid), _fd_count(balancer))
    rss = (_rss_kb(master.pid), _rss_kb(balancer))
    for n in range(11, 211):
        master.signal(signal.SIGHUP)
        master.wait_log(f"generation {n + 1} serving", timeout=20)
    wait_for(drained, message="the old generations to drain")
    assert master.balancer() == balancer
    assert (_fd_count(master.pid), _fd_count(balancer)) == fds
    states = [Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] for pid in master.workers()]
    assert "Z" not in states
    # Memory is flat: allow for allocator noise, not for per-reload growth.
    assert _rss_kb(master.pid) - rss[0] < 2048
    assert _rss_kb(balancer) - rss[1] < 2048
    assert get_json(port)["env"] == "v0"
