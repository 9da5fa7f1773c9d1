"""The balancer as real processes: Host routing, worker choice, reuseport, resilience."""
from __future__ import annotations

import collections
import http.client
import json
import os
import pwd
import signal
import socket
import threading
from pathlib import Path

from conftest import (
    REPO,
    alive,
    cmdline,
    free_port,
    http_request,
    listening_inode,
    proc_status,
    wait_for,
)

from supervisor.system import users

ROOT = os.geteuid() == 0


def app_block(name, listener="web", workers=1, extra=""):
    return f"""
        [apps.{name}]
        module = "tests.apps.probe:app"
        listeners = ["{listener}"]
        workers = {workers}
        chdir = "{REPO}"
        {extra}
    """


def master_config(port, mode="balance", **master):
    extra = "\n".join(f"{k} = {v}" for k, v in master.items())
    return f"""
        [master]
        graceful_timeout = 5
        {extra}

        [listeners.web]
        bind = "127.0.0.1:{port}"
        mode = "{mode}"
    """


def balancer_pid(master):
    return master.balancer()


def connections(health, app):
    """The balancer's count of `app`'s open connections, from its /metrics."""
    prefix = f'baton_connections{{app="{app}"}} '
    for line in http_request(health, "/metrics")[2].decode().splitlines():
        if line.startswith(prefix):
            return int(line[len(prefix):])
    return None


def connections_held(pid, port):
    """How many connections accepted on `port` process `pid` has an fd of."""
    accepted = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] != "0A":  # not the listener
            accepted.add(f"socket:[{fields[9]}]")
    fds = Path(f"/proc/{pid}/fd")
    return sum(1 for fd in fds.iterdir() if _readlink(fd) in accepted)


def _readlink(path):
    try:
        return os.readlink(path)
    except FileNotFoundError:  # closed while we looked
        return None


def request_pid(port, path="/", headers=None, source=None):
    """One request on a new connection; returns (status, pid or None)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0) if source else None)
    with sock:
        head = "".join(f"{k}: {v}\r\n" for k, v in (headers or {"Host": "x"}).items())
        sock.sendall(f"GET {path} HTTP/1.1\r\n{head}Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    body = data.split(b"\r\n\r\n", 1)[1]
    pid = json.loads(body)["pid"] if status == 200 else None
    return status, pid


def test_two_apps_under_different_users_share_one_port_by_host(baton, port):
    users = ('user = "www-data"', 'user = "nobody"') if ROOT else ("", "")
    master = baton(master_config(port)
                   + app_block("alpha", extra=f'hosts = ["alpha.test"]\n{users[0]}')
                   + app_block("beta", extra=f'hosts = ["beta.test", "*.beta.test"]\n{users[1]}'))
    master.wait_workers(2)
    alpha = get_json_host(port, "alpha.test")
    beta = get_json_host(port, "WWW.Beta.Test:8080")
    assert alpha["pid"] != beta["pid"]
    if ROOT:
        assert alpha["uid"] == pwd.getpwnam("www-data").pw_uid
        assert beta["uid"] == pwd.getpwnam("nobody").pw_uid
    assert http_request(port, "/", headers={"Host": "gamma.test"})[0] == 421


def get_json_host(port, host):
    status, _, body = http_request(port, "/", headers={"Host": host})
    assert status == 200, body
    return json.loads(body)


def test_unknown_host_goes_to_the_default_app(baton, port):
    master = baton(master_config(port)
                   + app_block("alpha", extra='hosts = ["alpha.test"]')
                   + app_block("fallback", extra="default = true"))
    master.wait_workers(2)
    assert get_json_host(port, "alpha.test")["pid"] != get_json_host(port, "nobody.test")["pid"]


def test_balancer_runs_unprivileged_as_an_id_no_app_shares(baton, port):
    """Issue #11 item 5: an app that names no user runs as nobody, so a balancer running
    as nobody could be stopped or killed by any such app."""
    master = baton(master_config(port) + app_block("alpha") + app_block("beta", listener="other")
                   + f'[listeners.other]\nbind = "127.0.0.1:{free_port()}"\n')
    pid = balancer_pid(master)
    uids = proc_status(pid)["Uid"].split()
    if not ROOT:
        assert uids == [str(os.geteuid())] * 4
        return
    uid = int(uids[0])
    assert uids == [str(uid)] * 4 and uid != 0
    assert uid != pwd.getpwnam("nobody").pw_uid and users.user(uid) is None
    assert proc_status(pid)["Groups"] == ""   # no supplementary groups: no name to look them up by
    workers = master.wait_workers(2)
    assert uid not in {int(proc_status(w)["Uid"].split()[0]) for w in workers}
    master.wait_log(f"the balancer runs as uid {uid} (no app can run as it; set [master] balancer_user to choose)")
    assert f"baton: balancer (uid {uid})" in cmdline(pid)


def test_least_connections_routes_around_a_worker_busy_with_a_slow_request(baton, port, scratch):
    health = free_port()
    master = baton(master_config(port, health=f'"127.0.0.1:{health}"') + app_block("alpha", workers=2))
    master.wait_workers(2)
    mark = scratch / "slow-running"
    slow = {}
    thread = threading.Thread(target=lambda: slow.update(r=request_pid(port, f"/?sleep=2&mark={mark}")))
    thread.start()
    wait_for(mark.exists, message="the slow request to start")
    quick = []
    for _ in range(10):
        # A worker reports the connections it closed once per loop iteration, just after
        # the close: a client can be back before the report is in (it always could, once
        # it had read a Content-Length body). Wait until only the slow one is counted.
        wait_for(lambda: connections(health, "alpha") == 1, message="the quick connection's close to be heard")
        quick.append(request_pid(port))
    thread.join(10)
    busy_pid = slow["r"][1]
    assert all(status == 200 for status, _ in quick)
    assert busy_pid not in {pid for _, pid in quick}


def test_batched_reports_release_every_copy_and_count_every_connection(baton, port):
    health = free_port()
    # Not parked: the idle connections stay at their workers, to be counted there.
    master = baton(master_config(port, health=f'"127.0.0.1:{health}"')
                   + app_block("alpha", workers=2, extra="park_after = 0"))
    master.wait_workers(2)
    balancer = master.balancer()
    wait_for(lambda: connections(health, "alpha") == 0, message="/metrics to count alpha's connections")
    clients = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(200)]
    try:
        for client in clients:  # all sent before any answer is read: workers take them in batches
            client.request("GET", "/")
        responses = [client.getresponse() for client in clients]
        assert {(response.status, bool(response.read())) for response in responses} == {(200, True)}
        # Every connection is counted while open, and the balancer's copies are all closed:
        # each one was acknowledged.
        assert connections(health, "alpha") == 200
        wait_for(lambda: connections_held(balancer, port) == 0,
                 message=lambda: f"the balancer to close its copies; it holds {connections_held(balancer, port)}")
    finally:
        for client in clients:
            client.close()
    wait_for(lambda: connections(health, "alpha") == 0, message="every close to be reported")


def test_keep_alive_connections_spread_evenly(baton, port):
    # Connections that stay at their workers (parked ones are counted by the balancer
    # only while they wait, which timing decides): least-connections spreads them.
    master = baton(master_config(port) + app_block("alpha", workers=3, extra="park_after = 0"))
    master.wait_workers(3)
    connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(9)]
    pids = []
    for conn in connections:
        conn.request("GET", "/")
        pids.append(json.loads(conn.getresponse().read())["pid"])
    for conn in connections:
        conn.close()
    assert sorted(collections.Counter(pids).values()) == [3, 3, 3]


def test_ip_hash_keeps_a_client_on_its_worker(baton, port):
    master = baton(master_config(port) + app_block("alpha", workers=3, extra='balance = "ip-hash"'))
    master.wait_workers(3)
    chosen = {}
    for n in range(2, 22):
        source = f"127.0.0.{n}"
        pids = {request_pid(port, source=source)[1] for _ in range(3)}
        assert len(pids) == 1, (source, pids)
        chosen[source] = pids.pop()
    assert len(set(chosen.values())) > 1


def test_reuseport_serves_from_every_worker(baton, port):
    master = baton(master_config(port, mode="reuseport") + app_block("alpha", workers=3))
    workers = master.wait_workers(3)
    seen = {request_pid(port, source=f"127.0.0.{2 + n % 50}")[1] for n in range(150)}
    assert seen == set(workers)


def test_half_sent_heads_do_not_delay_a_normal_request(baton, port):
    master = baton(master_config(port)
                   + app_block("alpha", extra='hosts = ["alpha.test"]')
                   + app_block("beta", extra='hosts = ["beta.test"]'))
    master.wait_workers(2)
    stalled = []
    try:
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: alph")
            stalled.append(sock)
        assert get_json_host(port, "beta.test")["path"] == "/"
        assert get_json_host(port, "alpha.test")["path"] == "/"
    finally:
        for sock in stalled:
            sock.close()


def test_killed_balancer_is_restarted_and_no_listener_is_closed(baton, port):
    master = baton(master_config(port) + app_block("alpha", workers=2))
    first = balancer_pid(master)
    master.wait_workers(2, exclude=(first,))
    before = listening_inode(port)
    os.kill(first, signal.SIGKILL)
    # Sent at once, while the balancer may still be down: the backlog keeps it.
    assert request_pid(port)[0] == 200
    wait_for(lambda: master.balancer() != first and alive(master.balancer()), message="a new balancer")
    assert listening_inode(port) == before  # the very same socket, never closed
    assert {request_pid(port)[0] for _ in range(5)} == {200}


def test_a_connection_sent_to_a_dying_worker_is_handed_to_another(baton, port):
    master = baton(master_config(port) + app_block("alpha", workers=2))
    pids = master.wait_workers(2)
    frozen = pids[0]
    os.kill(frozen, signal.SIGSTOP)  # it will never take the connections sent to it
    results = []
    threads = [threading.Thread(target=lambda: results.append(request_pid(port))) for _ in range(6)]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: len(results) >= 3, message="the healthy worker's share")
        os.kill(frozen, signal.SIGKILL)
    finally:
        _resume(frozen)
    for thread in threads:
        thread.join(10)
    assert len(results) == 6
    assert {status for status, _ in results} == {200}
    assert frozen not in {pid for _, pid in results}


def test_connections_sent_to_a_stopped_worker_are_taken_back_for_the_other_while_it_lives(baton, port):
    """What a worker has not read yet is taken back from its channel once it is silent
    and another worker is free: none of the six waits for the stopped one, which is
    never killed."""
    master = baton(master_config(port) + app_block("alpha", workers=2))
    pids = master.wait_workers(2)
    frozen = pids[0]
    os.kill(frozen, signal.SIGSTOP)  # it will read nothing more
    results = []
    threads = [threading.Thread(target=lambda: results.append(request_pid(port))) for _ in range(6)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert len(results) == 6
        assert {status for status, _ in results} == {200}
        assert {pid for _, pid in results} == {pids[1]}
    finally:
        _resume(frozen)


def test_reuseport_connections_queued_at_a_dead_worker_are_served_by_its_replacement(baton, port):
    master = baton(master_config(port, mode="reuseport") + app_block("alpha", workers=2))
    pids = master.wait_workers(2)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)  # nobody accepts: connections wait in each socket's queue
    results = []
    threads = [threading.Thread(target=lambda n=n: results.append(request_pid(port, source=f"127.0.0.{2 + n}")))
               for n in range(12)]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: _queued(port) == 12, message="12 connections queued")
        for pid in pids:
            os.kill(pid, signal.SIGKILL)  # their replacements inherit the very same sockets
    finally:
        for pid in pids:
            _resume(pid)
    for thread in threads:
        thread.join(15)
    assert sorted(status for status, _ in results) == [200] * 12
    assert not set(pids) & {pid for _, pid in results}


def _resume(pid):
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass  # already killed and reaped


def _queued(port):
    """Connections waiting in the accept queues of every socket listening on `port`."""
    total = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
            total += int(fields[4].split(":")[1], 16)  # rx_queue of a listener: its backlog
    return total
