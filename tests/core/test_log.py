"""Log setup: text and JSON lines, access records formatted only when logged, and the
logrotate reopen — the master reopens the files, its children adopt the new fds."""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import stat
import sys
import traceback

import pytest

from supervisor.http.accesslog import AccessFormatError, AccessRecord
from supervisor.system import log

DEADLINE_S = 10.0


@pytest.fixture
def make_logs():
    """`setup()` whose handlers are removed and files closed after the test."""
    made = []

    def make(**kwargs) -> log.Logs:
        logs = log.setup(**kwargs)
        made.append(logs)
        return logs
    yield make
    for logs in made:
        logs.close()


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def access_record(status: str = "200") -> AccessRecord:
    return AccessRecord(("192.0.2.1", 4000), b"GET", b"/x?y=1", b"/x", b"y=1", "1.1", status, 5,
                        [(b"User-Agent", b"ua/1")], (), 10.0, 10.002)


def lines(path) -> list[str]:
    return path.read_text().splitlines()


# -- formats -----------------------------------------------------------------


def test_text_error_and_access_lines(tmp_path, make_logs):
    logs = make_logs(error_log=str(tmp_path / "error.log"), access_log=str(tmp_path / "access.log"))
    logs.error.info("hello %s", "world")
    logs.access.info(access_record())
    [error_line] = lines(tmp_path / "error.log")
    assert error_line.endswith(f"] [{os.getpid()}] [INFO] hello world")
    [access_line] = lines(tmp_path / "access.log")
    assert access_line.startswith('192.0.2.1 - - [') and access_line.endswith('] "GET /x?y=1 HTTP/1.1" 200 5 "-" "ua/1"')


def test_json_error_lines_carry_time_level_pid_message_logger_and_exc(tmp_path, make_logs):
    logs = make_logs(error_log=str(tmp_path / "error.log"), log_format="json", level="debug")
    logs.error.warning("disk %d%% full", 91)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logs.error.exception("it broke")
    first, second = (json.loads(line) for line in lines(tmp_path / "error.log"))
    assert set(first) == {"time", "level", "pid", "message", "logger"}
    assert (first["level"], first["pid"], first["message"], first["logger"]) == (
        "warning", os.getpid(), "disk 91% full", log.ERROR_LOGGER)
    assert first["time"].endswith("Z") and first["time"][10] == "T" and len(first["time"]) == 24
    assert second["message"] == "it broke" and second["level"] == "error"
    assert second["exc"].startswith("Traceback") and "RuntimeError: boom" in second["exc"]


def test_json_access_lines_use_the_long_names(tmp_path, make_logs):
    logs = make_logs(access_log=str(tmp_path / "access.log"), log_format="json")
    logs.access.info(access_record("404"))
    [line] = lines(tmp_path / "access.log")
    obj = json.loads(line)
    assert {key: obj[key] for key in ("remote_addr", "method", "path", "query", "protocol", "status", "bytes",
                                      "user_agent", "referer", "duration_ms", "pid")} == {
        "remote_addr": "192.0.2.1", "method": "GET", "path": "/x", "query": "y=1", "protocol": "HTTP/1.1",
        "status": 404, "bytes": 5, "user_agent": "ua/1", "referer": None, "duration_ms": 2.0, "pid": os.getpid()}


def test_custom_access_format_and_plain_messages_on_the_access_logger(tmp_path, make_logs):
    logs = make_logs(access_log=str(tmp_path / "access.log"), access_log_format="%(m)s %(U)s %(s)s")
    log.log_access(logs.access, access_record())
    logs.access.info("a plain %s", "line")
    assert lines(tmp_path / "access.log") == ["GET /x 200", "a plain line"]
    assert logs.access_line(access_record()) == "GET /x 200"
    assert (logs.access_line.needs_environ, logs.access_line.needs_response_headers) == (False, False)
    assert make_logs().access_line is None


def test_a_bad_access_format_raises_before_any_file_is_opened(tmp_path, make_logs):
    with pytest.raises(AccessFormatError, match="unknown atom %\\(nope\\)s"):
        make_logs(error_log=str(tmp_path / "error.log"), access_log=str(tmp_path / "a.log"),
                  access_log_format="%(nope)s")
    assert not (tmp_path / "error.log").exists()
    with pytest.raises(ValueError, match="log_format"):
        make_logs(log_format="xml")


class _CountingFormatter(logging.Formatter):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def format(self, record):
        self.calls += 1
        return self.inner.format(record)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_nothing_is_formatted_for_a_disabled_logger(tmp_path, make_logs, log_format):
    logs = make_logs(error_log=str(tmp_path / "error.log"), access_log=str(tmp_path / "access.log"),
                     log_format=log_format, level="warning")
    spies = []
    for logger in (logs.error, logs.access):
        [handler] = logger.handlers
        handler.formatter = _CountingFormatter(handler.formatter)
        spies.append(handler.formatter)
    logs.error.info("below the level %s", object())
    logs.access.disabled = True
    logs.access.info(access_record())
    log.log_access(logs.access, access_record())
    logs.access.disabled = False
    logs.access.setLevel(logging.WARNING)
    log.log_access(logs.access, access_record())
    assert [spy.calls for spy in spies] == [0, 0]
    assert lines(tmp_path / "error.log") == [] and lines(tmp_path / "access.log") == []


def test_log_files_are_created_0640_and_stdio_is_never_a_path(tmp_path, make_logs, umask_022):
    logs = make_logs(error_log=str(tmp_path / "error.log"), access_log="-")
    assert stat.S_IMODE(os.stat(tmp_path / "error.log").st_mode) == 0o640
    assert dict(logs.paths) == {logs.fds[0]: str(tmp_path / "error.log")}
    assert logs.fds[1] == sys.stdout.fileno()
    assert not os.get_inheritable(logs.fds[0])


def test_setup_twice_replaces_handlers_and_closes_the_old_files(tmp_path, make_logs):
    first = make_logs(error_log=str(tmp_path / "one.log"))
    [old_handler] = first.error.handlers
    second = make_logs(error_log=str(tmp_path / "two.log"))
    assert old_handler.stream is None and second.error.handlers != [old_handler]
    second.error.error("x")
    assert lines(tmp_path / "one.log") == [] and len(lines(tmp_path / "two.log")) == 1


# -- reopen (SIGUSR1, logrotate) ---------------------------------------------


def rotate(tmp_path, *names) -> None:
    for name in names:
        os.rename(tmp_path / name, tmp_path / f"{name}.1")


def test_reopen_in_the_master_writes_to_the_new_files(tmp_path, make_logs, umask_022):
    logs = make_logs(error_log=str(tmp_path / "error.log"), access_log=str(tmp_path / "access.log"))
    fds_before = logs.fds
    logs.error.error("before")
    logs.access.info(access_record())
    rotate(tmp_path, "error.log", "access.log")

    pairs = logs.reopen()
    assert [number for number, _ in pairs] == list(fds_before)
    assert all(new_fd not in fds_before for _, new_fd in pairs)
    logs.release(pairs)
    for _, new_fd in pairs:
        with pytest.raises(OSError):
            os.fstat(new_fd)

    logs.error.error("after")
    logs.access.info(access_record("201"))
    os.write(logs.fds[0], b"raw write, as faulthandler does\n")
    assert logs.fds == fds_before
    assert [line.rsplit("] ", 1)[1] for line in lines(tmp_path / "error.log.1")] == ["before"]
    assert lines(tmp_path / "error.log")[0].endswith("[ERROR] after")
    assert lines(tmp_path / "error.log")[1] == "raw write, as faulthandler does"
    assert len(lines(tmp_path / "access.log.1")) == 1 and " 200 " in lines(tmp_path / "access.log.1")[0]
    assert len(lines(tmp_path / "access.log")) == 1 and " 201 " in lines(tmp_path / "access.log")[0]
    assert stat.S_IMODE(os.stat(tmp_path / "error.log").st_mode) == 0o640
    assert not os.get_inheritable(logs.fds[0])


def test_reopen_twice(tmp_path, make_logs):
    logs = make_logs(error_log=str(tmp_path / "error.log"))
    for generation in (1, 2):
        os.rename(tmp_path / "error.log", tmp_path / f"error.log.{generation}")
        logs.release(logs.reopen())
        logs.error.error("generation %d", generation)
    assert lines(tmp_path / "error.log.1") == []
    assert lines(tmp_path / "error.log.2")[0].endswith("generation 1")
    assert lines(tmp_path / "error.log")[0].endswith("generation 2")


def test_reopen_leaves_stdio_alone(make_logs):
    logs = make_logs(access_log="-")
    assert logs.reopen() == []


def test_a_path_that_cannot_be_reopened_keeps_the_old_file_and_says_so(tmp_path, make_logs):
    (tmp_path / "logs").mkdir()
    logs = make_logs(error_log=str(tmp_path / "logs" / "error.log"), access_log=str(tmp_path / "access.log"))
    shutil.move(tmp_path / "logs", tmp_path / "gone")   # the directory vanished: O_CREAT fails
    rotate(tmp_path, "access.log")
    pairs = logs.reopen()
    assert [number for number, _ in pairs] == [logs.fds[1]]
    logs.release(pairs)
    logs.error.error("still here")
    [problem, line] = lines(tmp_path / "gone" / "error.log")
    assert "cannot reopen log file" in problem and str(tmp_path / "logs" / "error.log") in problem
    assert line.endswith("still here")


def test_adopt_refuses_fds_that_are_not_log_fds_and_closes_what_it_got(tmp_path, make_logs):
    logs = make_logs(error_log=str(tmp_path / "error.log"))
    for numbers in ([logs.fds[0] + 100], [logs.fds[0], logs.fds[0]]):
        read_end, write_end = os.pipe()
        with pytest.raises(ValueError):
            logs.adopt(numbers, [read_end])
        with pytest.raises(OSError):
            os.fstat(read_end)
        os.close(write_end)
    logs.error.error("unchanged")
    assert lines(tmp_path / "error.log")[0].endswith("unchanged")


def test_a_forked_child_adopts_the_fds_the_master_sends(tmp_path, make_logs):
    """The worker's side: it inherited the log fds at fork and cannot open the paths
    (it runs as another user), so it takes the master's new fds over its channel."""
    logs = make_logs(error_log=str(tmp_path / "error.log"), access_log=str(tmp_path / "access.log"))
    master_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    master_end.settimeout(DEADLINE_S)
    child_end.settimeout(DEADLINE_S)
    pid = os.fork()
    if pid == 0:   # the child: never returns into pytest
        status = 1
        try:
            master_end.close()
            logs.error.error("child before")
            child_end.send(b"logged")
            data, fds, _, _ = socket.recv_fds(child_end, 1024, 8)
            logs.adopt(json.loads(data), fds)
            logs.error.error("child after")
            log.log_access(logs.access, access_record("202"))
            os.write(logs.fds[0], b"child raw\n")
            child_end.send(b"done")
            status = 0
        except BaseException:
            try:
                child_end.send(traceback.format_exc().encode()[-4000:])
            except OSError:
                pass
        finally:
            os._exit(status)
    child_end.close()
    try:
        assert master_end.recv(4096) == b"logged"
        rotate(tmp_path, "error.log", "access.log")
        pairs = logs.reopen()
        try:
            numbers = [number for number, _ in pairs]
            socket.send_fds(master_end, [json.dumps(numbers).encode()], [fd for _, fd in pairs])
        finally:
            logs.release(pairs)
        assert master_end.recv(4096) == b"done"
    finally:
        master_end.close()
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [line.rsplit("] ", 1)[1] for line in lines(tmp_path / "error.log.1")] == ["child before"]
    after = lines(tmp_path / "error.log")
    assert after[0].endswith("[ERROR] child after") and after[1] == "child raw"
    assert lines(tmp_path / "access.log.1") == []
    [access_line] = lines(tmp_path / "access.log")
    assert " 202 " in access_line
