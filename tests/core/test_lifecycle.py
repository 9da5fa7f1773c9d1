"""Worker lifecycle transitions and crash-loop backoff, on a plain-number clock."""
import pytest

from supervisor.master.lifecycle import (
    ALIVE,
    TRANSITIONS,
    Backoff,
    IllegalTransition,
    State,
)
from supervisor.master.supervision import WorkerRecord


def make_worker(state=State.SPAWNED):
    return WorkerRecord(key=1, app="a", index=1, generation=1, state=state, created_at=0.0)


@pytest.mark.parametrize("path", [
    [State.BOOTING, State.READY, State.DRAINING, State.EXITED],
    [State.BOOTING, State.READY, State.EXITED],
    [State.BOOTING, State.DRAINING, State.EXITED],
    [State.BOOTING, State.EXITED],
    [State.EXITED],
])
def test_legal_paths_from_spawned(path):
    worker = make_worker()
    for state in path:
        worker.move(state)
    assert worker.state is path[-1]


@pytest.mark.parametrize("path", [[State.SPAWNED, State.BOOTING], [State.EXITED]])
def test_a_slot_in_backoff_is_forked_or_dropped(path):
    worker = make_worker(State.BACKOFF)
    for state in path:
        worker.move(state)
    assert worker.state is path[-1]


@pytest.mark.parametrize("path", [
    [State.READY],                                   # not before it is forked
    [State.EXITED, State.READY],
    [State.BOOTING, State.READY, State.BOOTING],
    [State.BOOTING, State.READY, State.DRAINING, State.READY],
    [State.BOOTING, State.READY, State.READY],
    [State.BOOTING, State.BACKOFF],
])
def test_illegal_paths_raise(path):
    worker = make_worker()
    with pytest.raises(IllegalTransition):
        for state in path:
            worker.move(state)


def test_the_table_covers_every_state_and_alive_means_a_process():
    assert set(TRANSITIONS) == set(State)
    assert ALIVE == {State.SPAWNED, State.BOOTING, State.READY, State.DRAINING}


def test_backoff_grows_and_caps():
    backoff = Backoff(first_delay_s=0.1, max_delay_s=1.0, stable_after_s=5.0)
    delays = [backoff.record_exit(None, now=10.0) for _ in range(8)]
    assert delays[:4] == [0.1, 0.2, 0.4, 0.8]
    assert delays[4:] == [1.0] * 4


def test_backoff_resets_after_a_stable_worker():
    backoff = Backoff(first_delay_s=0.1, max_delay_s=1.0, stable_after_s=5.0)
    for _ in range(3):
        backoff.record_exit(None, now=1.0)
    assert backoff.record_exit(0.0, now=60.0) == 0.0
    assert backoff.record_exit(None, now=61.0) == 0.1
