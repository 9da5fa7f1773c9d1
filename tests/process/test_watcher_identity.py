"""The watcher gives up root (issue #11, item 12): it only reads the config and the
trees it watches, so it runs as the config file's owner, or (a file root owns) as the
balancer does, and still turns an edit into a reload."""
from __future__ import annotations

import os
import pwd

import pytest
from conftest import (
    Baton,
    children_of,
    cmdline,
    get_json,
    probe_config,
    proc_status,
    wait_for,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="only a root master has root to give up")


def config(port, value):
    return probe_config(port, f'env = {{ PROBE_VALUE = "{value}" }}')


def watcher_of(master) -> int:
    def find():
        for pid in children_of(master.pid):
            try:
                if cmdline(pid).startswith("baton: watcher"):   # titled once it dropped root
                    return pid
            except (FileNotFoundError, ProcessLookupError):
                pass
        return None
    return wait_for(find, message=lambda: f"the watcher; log:\n{master.log()}")


def uid_of(pid: int) -> int:
    uids = proc_status(pid)["Uid"].split()
    assert len(set(uids)) == 1, uids   # real, effective, saved and fs uid: all given up
    return int(uids[0])


@pytest.fixture
def started(scratch):
    """A master whose config lives in a directory any user can read (not under pytest's
    own tmp, which only root may enter)."""
    masters = []

    def start(port, owner: str | None = None) -> Baton:
        master = Baton(scratch, config(port, "v1"))
        if owner is not None:
            entry = pwd.getpwnam(owner)
            os.chown(master.config, entry.pw_uid, entry.pw_gid)
        masters.append(master.start())
        return master

    yield start
    for master in masters:
        master.close()


@pytest.mark.parametrize("owner", [None, "www-data"], ids=["root's file", "www-data's file"])
def test_the_watcher_runs_unprivileged_and_still_triggers_reloads(started, port, owner):
    master = started(port, owner)
    master.wait_workers(1)
    master.wait_log("is watching for changes")
    watcher = watcher_of(master)
    if owner is None:
        balancer = master.balancer()
        assert uid_of(watcher) == uid_of(balancer) != 0
        master.wait_log(f"the watcher runs as uid {uid_of(balancer)} (the balancer's identity: "
                        f"root owns the config file)")
    else:
        assert uid_of(watcher) == pwd.getpwnam(owner).pw_uid
        master.wait_log(f"the watcher runs as {owner} (the owner of the config file)")
    assert get_json(port)["env"] == "v1"
    text = master.config.read_text().replace('"v1"', '"v2"')
    master.config.write_text(text)
    wait_for(lambda: get_json(port)["env"] == "v2", message=lambda: f"the edit to be reloaded; log:\n{master.log()}")
    assert "changed on disk: config" in master.log()


def test_a_tree_the_watcher_could_not_read_is_named_and_it_stays_root(baton, port):
    """pytest's tmp directory is root's alone (0700): dropping would leave the watcher
    deaf to it, so it stays root and the log says why and what to change."""
    master = baton(config(port, "v1"))
    master.wait_workers(1)
    watcher = watcher_of(master)
    master.wait_log("the watcher stays root: uid ")
    assert f"cannot read {master.dir}" in master.log()
    assert uid_of(watcher) == 0
    master.config.write_text(master.config.read_text().replace('"v1"', '"v2"'))
    wait_for(lambda: get_json(port)["env"] == "v2", message=lambda: f"the edit to be reloaded; log:\n{master.log()}")
