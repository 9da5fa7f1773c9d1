"""What the master imports, and what its forks share with it (issue #14).

Every module the master imports is memory its balancer and watcher carry too; a module
a sidecar imports after the fork costs it several times its size (each allocation lands
in a page it shares with the master). Each case runs in a fresh interpreter, so what
this test process imported does not count.
"""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

SERVING_CODE = ("supervisor.http.server", "supervisor.worker.process", "supervisor.worker.template",
                "httptools", "ssl")


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code`."""
    out = subprocess.run([sys.executable, "-c", code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
                         cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_the_master_never_loads_the_workers_serving_code_nor_openssl():
    loaded = _modules_after("import supervisor.cli")
    assert "supervisor.master.process" in loaded
    assert not loaded & set(SERVING_CODE)


def test_a_master_that_needs_a_watcher_imports_watchdog_before_its_forks_and_only_then(tmp_path):
    path = tmp_path / "baton.toml"
    path.write_text('[listeners.web]\nbind = "127.0.0.1:0"\n\n'
                    '[apps.probe]\nmodule = "tests.apps.probe:app"\nlisteners = ["web"]\n')
    prepare = ("from supervisor.config import reader\n"
               "from supervisor.master import watcher_handle\n"
               "config = reader.load({path!r})\n"
               "{change}\n"
               "watcher_handle.prepare(config)\n")
    watched = _modules_after(prepare.format(path=str(path), change=""))
    assert "watchdog.observers" in watched
    # `baton serve` without --reload: no file, nothing to watch, no watchdog.
    unwatched = _modules_after(prepare.format(path=str(path), change="import dataclasses\n"
                                              "config = dataclasses.replace(config, path=None)"))
    assert "watchdog" not in unwatched
