"""An app's workers hold only that app's configuration, and no log file: what app code
can find in its own memory, /proc and fds, and what it can do to the logs."""
from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
from conftest import REPO, cmdline, free_port, get_json, http_request, wait_for

MARKER = "h4-secret-"   # tests/apps/snoop.py's


@pytest.fixture
def two_apps(baton, port):
    """Apps a (port) and b (port + its own listener), each with a secret in its env."""
    other = free_port()
    secret_a, secret_b = MARKER + "a-" + secrets.token_hex(8), MARKER + "b-" + secrets.token_hex(8)
    master = baton(f"""
        [listeners.a]
        bind = "127.0.0.1:{port}"

        [listeners.b]
        bind = "127.0.0.1:{other}"

        [apps.a]
        module = "tests.apps.snoop:app"
        listeners = ["a"]
        chdir = "{REPO}"
        env = {{ A_SECRET = "{secret_a}" }}

        [apps.b]
        module = "tests.apps.snoop:app"
        listeners = ["b"]
        chdir = "{REPO}"
        env = {{ B_SECRET = "{secret_b}" }}
    """)
    master.wait_workers(2)
    return master, (port, secret_a), (other, secret_b)


def test_an_apps_worker_finds_no_other_apps_secret_nor_the_masters_objects(two_apps):
    master, (port_a, secret_a), (port_b, secret_b) = two_apps
    found_a, found_b = get_json(port_a), get_json(port_b)
    # The search works: each worker finds its own app's secret (in its environment).
    assert secret_a in found_a["secrets"] and secret_b in found_b["secrets"]
    assert secret_b not in found_a["secrets"] and secret_a not in found_b["secrets"]
    assert found_a["objects"] == [] and found_b["objects"] == []
    assert found_a["master_modules"] == []


def test_an_apps_worker_shows_no_other_secret_in_proc(two_apps):
    master, (port_a, secret_a), (port_b, secret_b) = two_apps
    worker_a, worker_b = get_json(port_a)["pid"], get_json(port_b)["pid"]
    assert secret_b.encode() not in Path(f"/proc/{worker_a}/environ").read_bytes()
    assert secret_a.encode() not in Path(f"/proc/{worker_b}/environ").read_bytes()
    for pid in (worker_a, worker_b):   # argv is world-readable
        assert MARKER not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    assert cmdline(worker_a).startswith("baton: worker a#")


def _logged(baton, port, tmp_path, access, module, extra=""):
    error = tmp_path / "error.log"
    master = baton(f"""
        [master]
        error_log = "{error}"
        access_log = "{access}"
        {extra}

        [listeners.web]
        bind = "127.0.0.1:{port}"

        [apps.{module}]
        module = "tests.apps.{module}:app"
        listeners = ["web"]
        chdir = "{REPO}"
    """)
    def ready():   # the master's log is the file, not its stderr
        text = error.read_text() if error.exists() else ""
        return next((pid for pid in master.workers() if f"(pid {pid}) ready" in text), None)
    worker = wait_for(ready, message=lambda: f"a ready worker; log:\n{master.log()}")
    return master, worker, error


def test_app_code_can_neither_truncate_nor_forge_the_logs(baton, port, tmp_path):
    access = tmp_path / "access.log"
    master, worker, error = _logged(baton, port, tmp_path, access, "forger")
    http_request(port, "/warm-up")
    wait_for(lambda: "/warm-up" in access.read_text(), message="the first access line")
    error_before, access_before = error.read_bytes(), access.read_bytes()

    status, _, body = http_request(port, "/attack")
    assert status == 200
    done = json.loads(body)
    assert done["truncated"] == [] and done["parent"] == []   # nothing it holds is a file
    assert {1, 2} <= set(done["wrote"])                       # its stdout and stderr: pipes
    wait_for(lambda: "/attack" in access.read_text(), message="the attack's access line")
    wait_for(lambda: error.read_bytes().count(b"FORGED") >= 2, message="the forged lines, tagged")

    tag = f"forger[{worker}]: ".encode()
    for path, before in ((error, error_before), (access, access_before)):
        after = path.read_bytes()
        assert after.startswith(before), f"{path.name} was rewritten"
        new = after[len(before):].splitlines()
        forged = [line for line in new if b"FORGED" in line]
        assert forged and all(line.startswith(tag) for line in forged), forged
        # Every other new line is the master's own (text: it opens with the time) or tagged.
        assert all(line.startswith((tag, b"[")) for line in new), new


def test_in_json_logs_the_master_sets_app_and_pid_on_every_line(baton, port, tmp_path):
    access = tmp_path / "access.log"
    master, worker, error = _logged(baton, port, tmp_path, access, "forger", extra='log_format = "json"')
    assert http_request(port, "/attack")[0] == 200
    wait_for(lambda: error.read_text().count("FORGED") >= 2 and "/attack" in access.read_text(),
             message="the forged lines and the access line")
    records = [json.loads(line) for line in error.read_text().splitlines()]
    ours = [r for r in records if r.get("app") == "forger"]
    assert all(r["pid"] == worker for r in ours)
    assert any("ready" in r["message"] for r in records if "app" not in r)           # the master's own
    assert [r["logger"] for r in ours if "FORGED" in r["message"]] == ["output", "output"]  # fds 1 and 2
    (line,) = [json.loads(line) for line in access.read_text().splitlines() if "/attack" in line]
    assert line["app"] == "forger" and line["pid"] == worker


def test_a_full_disk_under_the_access_log_costs_one_error_line_and_no_request(baton, port, tmp_path):
    master, worker, error = _logged(baton, port, tmp_path, "/dev/full", "probe")
    for i in range(20):
        assert get_json(port, f"/served-{i}")["pid"] == worker
    wait_for(lambda: "cannot write to the access log" in error.read_text(), message="the error line")
    text = error.read_text()
    assert text.count("cannot write to the access log") == 1   # at most one a minute
    assert "No space left on device" in text and "Traceback" not in text
    assert get_json(port, "/still")["pid"] == worker
