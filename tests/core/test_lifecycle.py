"""Worker lifecycle transitions and crash-loop backoff, on a plain-number clock."""
import pytest

from supervisor.master.lifecycle import Backoff, IllegalTransition, State, Worker


def make_worker(spawned_at=0.0):
    return Worker(app="a", index=1, generation=1, pid=100, spawned_at=spawned_at)


@pytest.mark.parametrize("path", [
    [State.READY, State.DRAINING, State.EXITED],
    [State.BOOTING, State.READY, State.EXITED],
    [State.EXITED],
    [State.DRAINING, State.EXITED],
])
def test_legal_paths(path):
    worker = make_worker()
    for step, state in enumerate(path):
        worker.move(state, now=float(step))
    assert worker.state is path[-1]


@pytest.mark.parametrize("path", [
    [State.EXITED, State.READY],
    [State.READY, State.BOOTING],
    [State.READY, State.DRAINING, State.READY],
    [State.READY, State.READY],
])
def test_illegal_paths_raise(path):
    worker = make_worker()
    with pytest.raises(IllegalTransition):
        for state in path:
            worker.move(state, now=1.0)


def test_ready_records_time():
    worker = make_worker()
    worker.move(State.READY, now=7.5)
    assert worker.ready_at == 7.5


def test_backoff_grows_and_caps():
    backoff = Backoff(first_delay_s=0.1, max_delay_s=1.0, stable_after_s=5.0)
    delays = [backoff.record_exit(make_worker(), now=10.0) for _ in range(8)]
    assert delays[:4] == [0.1, 0.2, 0.4, 0.8]
    assert delays[4:] == [1.0] * 4


def test_backoff_resets_after_a_stable_worker():
    backoff = Backoff(first_delay_s=0.1, max_delay_s=1.0, stable_after_s=5.0)
    for _ in range(3):
        backoff.record_exit(make_worker(), now=1.0)
    stable = make_worker()
    stable.move(State.READY, now=0.0)
    assert backoff.record_exit(stable, now=60.0) == 0.0
    assert backoff.record_exit(make_worker(), now=61.0) == 0.1
