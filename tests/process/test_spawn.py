"""Post-fork hygiene of every child Baton forks."""
import gc
import os
import select

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


def test_the_child_keeps_what_it_inherited_out_of_its_collectors_reach():
    # A collection would write to every inherited object's header, copying each page
    # the child shares with the parent: what it inherited is frozen instead.
    inherited = [object()]

    def child():
        return 0 if not any(o is inherited for o in gc.get_objects()) and gc.get_freeze_count() else 1

    assert any(o is inherited for o in gc.get_objects())
    assert os.WEXITSTATUS(_exit_status_of(child)) == 0


def test_an_exception_in_the_child_never_returns_into_the_parent():
    def child():
        raise RuntimeError("boom")

    status = _exit_status_of(child)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 1


# -- reap -------------------------------------------------------------------------


def test_reap_blocking_returns_the_wait_status():
    pid = spawn.fork(lambda: 3, ())
    status = spawn.reap(pid, block=True)
    assert os.waitstatus_to_exitcode(status) == 3


def test_reap_without_blocking_is_none_while_the_child_runs_then_its_status():
    read_end, write_end = os.pipe()

    def child():
        os.read(read_end, 1)   # runs until the parent writes
        return 5

    pid = spawn.fork(child, [read_end])
    os.close(read_end)
    pidfd = os.pidfd_open(pid)
    try:
        assert spawn.reap(pid, block=False) is None
        os.write(write_end, b"x")
        select.select([pidfd], [], [], 10.0)   # readable once the child has exited
        assert os.waitstatus_to_exitcode(spawn.reap(pid, block=False)) == 5
    finally:
        os.close(pidfd)
        os.close(write_end)


def test_reap_of_a_child_collected_already_is_none_and_never_raises():
    pid = spawn.fork(lambda: 0, ())
    os.waitpid(pid, 0)   # someone else got there first
    assert spawn.reap(pid, block=True) is None
    assert spawn.reap(pid, block=False) is None


# -- exec -------------------------------------------------------------------------


def test_a_new_interpreter_gets_the_flags_that_matter():
    import subprocess
    import sys
    code = "from supervisor.system.spawn import interpreter_flags; print(interpreter_flags())"
    out = subprocess.run([sys.executable, "-I", "-OO", "-B", "-Wdefault", "-Xfrozen_modules=off", "-c", code],
                         capture_output=True, text=True, check=True, cwd="/").stdout
    assert out.strip() == "['-I', '-OO', '-B', '-Wdefault', '-Xfrozen_modules=off']"
