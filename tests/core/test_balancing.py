"""Worker choice policies, on plain lists of WorkerLoad."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from supervisor.balancer.policies import (
    DEFAULT_POLICY,
    POLICIES,
    IpHash,
    LeastConnections,
    RandomTwo,
    RoundRobin,
    WorkerLoad,
    make_policy,
)


def workers(*loads: tuple[int, int] | int) -> list[WorkerLoad]:
    """Workers keyed 100, 101, ...; each load is `connections` or `(connections, busy)`."""
    out = []
    for i, load in enumerate(loads):
        connections, busy = load if isinstance(load, tuple) else (load, 0)
        out.append(WorkerLoad(key=100 + i, connections=connections, busy=busy))
    return out


def keys(policy, pool, picks, client=None):
    return [policy.pick(pool, client).key for _ in range(picks)]


# ---------------------------------------------------------------------------------------
# make_policy


def test_policy_names():
    assert POLICIES == ("least-connections", "round-robin", "random-two", "ip-hash")
    assert DEFAULT_POLICY == "least-connections"
    assert isinstance(make_policy(), LeastConnections)
    kinds = {name: type(make_policy(name, random.Random(1))) for name in POLICIES}
    assert kinds == {"least-connections": LeastConnections, "round-robin": RoundRobin,
                     "random-two": RandomTwo, "ip-hash": IpHash}


@pytest.mark.parametrize("name", ["", "least_connections", "Round-Robin", "random", "leastconn"])
def test_unknown_policy(name):
    with pytest.raises(ValueError, match="unknown balancing policy"):
        make_policy(name)


def test_instances_share_no_state():
    pool = workers(0, 0, 0)
    first, second = make_policy("round-robin"), make_policy("round-robin")
    assert keys(first, pool, 2) == [100, 101]
    assert keys(second, pool, 1) == [100]


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("client", [None, "192.0.2.1"])
def test_empty_list(name, client):
    assert make_policy(name, random.Random(0)).pick([], client) is None


@pytest.mark.parametrize("name", POLICIES)
def test_single_worker(name):
    pool = workers(5)
    policy = make_policy(name, random.Random(0))
    assert all(policy.pick(pool, client) is pool[0] for client in (None, "a", "b", "c"))


@pytest.mark.parametrize("name", POLICIES)
def test_returns_a_given_object_and_mutates_nothing(name):
    pool = workers((3, 1), (0, 0), (2, 2))
    before = [(w.key, w.connections, w.busy) for w in pool]
    policy = make_policy(name, random.Random(0))
    for i in range(50):
        choice = policy.pick(pool, f"10.0.0.{i}")
        assert any(choice is w for w in pool)
    assert [(w.key, w.connections, w.busy) for w in pool] == before


@pytest.mark.parametrize("name", POLICIES)
def test_survives_churn(name):
    # Workers join and leave between every pick; every answer is a current worker.
    rng = random.Random(7)
    policy = make_policy(name, random.Random(3))
    pool = workers(0, 0, 0)
    next_key = 200
    for i in range(300):
        if pool and rng.random() < 0.4:
            pool.pop(rng.randrange(len(pool)))
        if rng.random() < 0.4:
            pool.insert(rng.randrange(len(pool) + 1), WorkerLoad(next_key, rng.randrange(4)))
            next_key += 1
        choice = policy.pick(pool, rng.choice([None, "a", "b"]))
        assert (choice is None) == (not pool)
        assert choice is None or any(choice is w for w in pool)


# ---------------------------------------------------------------------------------------
# least-connections


@pytest.mark.parametrize("loads, expected", [
    ((3, 1, 2), 101),
    ((0, 5, 5), 100),
    (((1, 3), (1, 0), (2, 0)), 101),        # equal connections: fewer busy wins
    (((1, 0), (0, 9)), 101),                # connections first, busy only breaks ties
    ((7,), 100),
])
def test_least_connections_picks_the_least_loaded(loads, expected):
    assert LeastConnections().pick(workers(*loads), None).key == expected


def test_least_connections_rotates_among_ties():
    # Stale reports: every worker looks idle for a whole burst, which must be spread.
    pool = workers(0, 0, 0, 0)
    counts = Counter(keys(LeastConnections(), pool, 400))
    assert counts == {100: 100, 101: 100, 102: 100, 103: 100}


def test_least_connections_rotates_only_among_the_least_loaded():
    pool = workers(1, 0, 1, 0, 0)
    assert Counter(keys(LeastConnections(), pool, 300)) == {101: 100, 103: 100, 104: 100}


def test_least_connections_with_fresh_reports_stays_even():
    # When the caller counts each handed-out connection, load evens out exactly.
    pool = workers(4, 0, 2)
    policy = LeastConnections()
    for _ in range(30):
        policy.pick(pool, None).connections += 1
    assert sorted(w.connections for w in pool) == [12, 12, 12]


# ---------------------------------------------------------------------------------------
# round-robin


def test_round_robin_is_even_and_ignores_load():
    pool = workers(9, 0, 5)
    assert keys(RoundRobin(), pool, 7) == [100, 101, 102, 100, 101, 102, 100]
    assert Counter(keys(RoundRobin(), pool, 300)) == {100: 100, 101: 100, 102: 100}


@pytest.mark.parametrize("change, expected_next", [
    # After picking 100, 101 (last = 101):
    (lambda pool: pool.pop(0), [102, 103, 101]),               # someone before leaves
    (lambda pool: pool.pop(3), [102, 100, 101]),               # someone after leaves
    (lambda pool: pool.pop(1), [102, 103, 100]),               # the last-picked leaves
    (lambda pool: pool.pop(), [102, 100, 101]),                 # the tail leaves
    (lambda pool: pool.insert(0, WorkerLoad(9)), [102, 103, 9]),  # joins before
    (lambda pool: pool.insert(2, WorkerLoad(9)), [9, 102, 103]),  # joins right after
    (lambda pool: pool.reverse(), [100, 103, 102]),            # reordered
])
def test_round_robin_follows_the_last_pick_through_churn(change, expected_next):
    pool = workers(0, 0, 0, 0)
    policy = RoundRobin()
    assert keys(policy, pool, 2) == [100, 101]
    change(pool)
    assert keys(policy, pool, 3) == expected_next


def test_round_robin_last_picked_at_the_end_leaves():
    pool = workers(0, 0, 0)
    policy = RoundRobin()
    assert keys(policy, pool, 3) == [100, 101, 102]
    pool.pop()
    assert keys(policy, pool, 2) == [100, 101]


def test_round_robin_whole_pool_replaced():
    policy = RoundRobin()
    keys(policy, workers(0, 0, 0), 2)
    fresh = [WorkerLoad(1), WorkerLoad(2), WorkerLoad(3)]
    assert sorted(keys(policy, fresh, 3)) == [1, 2, 3]


# ---------------------------------------------------------------------------------------
# random-two


def test_random_two_is_deterministic_with_a_seeded_rng():
    pool = workers(3, 1, 4, 1, 5, 9, 2, 6)
    first = keys(RandomTwo(random.Random(42)), pool, 200)
    second = keys(RandomTwo(random.Random(42)), pool, 200)
    assert first == second
    assert keys(make_policy("random-two", random.Random(42)), pool, 200) == first


def test_random_two_takes_the_less_loaded_of_its_pair():
    pool = workers(3, 1, 4, 1, 5, 9, 2, 6)
    loads = {w.key: (w.connections, w.busy) for w in pool}
    mirror = random.Random(9)
    policy = RandomTwo(random.Random(9))
    for _ in range(200):
        a, b = mirror.sample(range(len(pool)), 2)
        expected = pool[b] if loads[pool[b].key] < loads[pool[a].key] else pool[a]
        assert policy.pick(pool, None) is expected


def test_random_two_never_picks_the_most_loaded():
    pool = workers(0, 0, 0, 50)
    assert 103 not in keys(RandomTwo(random.Random(1)), pool, 500)


def test_random_two_spreads_equal_workers():
    counts = Counter(keys(RandomTwo(random.Random(5)), workers(0, 0, 0, 0), 4000))
    assert set(counts) == {100, 101, 102, 103}
    assert all(800 < n < 1200 for n in counts.values())


def test_random_two_uses_busy_to_break_connection_ties():
    pool = workers((2, 5), (2, 0))
    assert set(keys(RandomTwo(random.Random(0)), pool, 50)) == {101}


def test_random_two_default_rng_is_private():
    # Without an injected rng, drawing must not disturb the random module's shared state.
    random.seed(123)
    expected = random.random()
    random.seed(123)
    RandomTwo().pick(workers(0, 0, 0), None)
    assert random.random() == expected


# ---------------------------------------------------------------------------------------
# ip-hash

CLIENTS = [f"198.51.100.{i}" for i in range(200)] + [f"2001:db8::{i:x}" for i in range(200)]


def assignment(policy, pool):
    return {client: policy.pick(pool, client).key for client in CLIENTS}


def test_ip_hash_is_sticky_across_calls_and_instances_and_load():
    pool = workers(0, 0, 0, 0, 0)
    first = assignment(IpHash(), pool)
    policy = IpHash()
    assert assignment(policy, pool) == first
    assert assignment(policy, pool) == first
    for w in pool:
        w.connections = w.key % 7                 # load changes do not move anyone
    assert assignment(policy, pool) == first
    assert assignment(policy, list(reversed(pool))) == first   # nor does list order


def test_ip_hash_spreads_clients():
    counts = Counter(assignment(IpHash(), workers(0, 0, 0, 0)).values())
    assert set(counts) == {100, 101, 102, 103}
    assert all(60 < n < 140 for n in counts.values())


def test_ip_hash_removal_moves_only_the_removed_workers_clients():
    pool = workers(0, 0, 0, 0, 0)
    policy = IpHash()
    before = assignment(policy, pool)
    gone = pool.pop(2).key
    after = assignment(policy, pool)
    moved = {client for client in CLIENTS if before[client] != after[client]}
    assert moved == {client for client in CLIENTS if before[client] == gone}
    assert moved                                   # the removed worker did have clients


def test_ip_hash_addition_takes_clients_only_for_the_new_worker():
    pool = workers(0, 0, 0, 0)
    before = assignment(IpHash(), pool)
    pool.append(WorkerLoad(999))
    after = assignment(IpHash(), pool)
    assert all(after[c] in (before[c], 999) for c in CLIENTS)
    assert 999 in after.values()


def test_ip_hash_is_stable_across_processes():
    # A stable hash (blake2b, not the salted hash()): these values hold in every run and
    # every process, so all balancer processes agree.
    expected = {"10.0.0.1": 102, "10.0.0.2": 102, "10.0.0.3": 104, "10.0.0.4": 103,
                "10.0.0.5": 101, "10.0.0.6": 104, "10.0.0.7": 103, "10.0.0.8": 101,
                "::1": 102, "192.0.2.7": 103}
    pool = workers(0, 0, 0, 0, 0)
    assert {client: IpHash().pick(pool, client).key for client in expected} == expected


def test_ip_hash_without_client_falls_back_to_least_connections():
    pool = workers(3, 0, 0, 2)
    assert keys(IpHash(), pool, 4, client=None) == [101, 102, 101, 102]
