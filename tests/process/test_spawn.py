"""Post-fork hygiene of every child Baton forks."""
import os

from supervisor.system import spawn


def _exit_status_of(child_main, keep=()):
    pid = spawn.fork(child_main, keep)
    _, status = os.waitpid(pid, 0)
    return status


def test_a_write_to_a_vanished_peer_raises_in_the_child_instead_of_killing_it():
    read_end, write_end = os.pipe()
    os.close(read_end)

    def child():
        try:
            os.write(write_end, b"x")
        except BrokenPipeError:
            return 42
        return 1

    status = _exit_status_of(child, keep=[write_end])
    os.close(write_end)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 42


def test_the_child_keeps_only_the_fds_it_owns():
    kept_r, kept_w = os.pipe()
    other_r, other_w = os.pipe()

    def child():
        open_fds = {int(fd) for fd in os.listdir("/proc/self/fd")}
        os.write(kept_w, b"%d" % (other_r in open_fds or other_w in open_fds))
        return 0

    assert os.WEXITSTATUS(_exit_status_of(child, keep=[kept_w])) == 0
    assert os.read(kept_r, 1) == b"0"
    for fd in (kept_r, kept_w, other_r, other_w):
        os.close(fd)


def test_an_exception_in_the_child_never_returns_into_the_parent():
    def child():
        raise RuntimeError("boom")

    status = _exit_status_of(child)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 1
