"""The attached workers' registry (master.attached): which tag serves, promotes, deadlines.

Each case is a script of events on a fake clock and the actions (less the log lines)
they must give."""
from __future__ import annotations

import pytest

from supervisor.master.attach_points import Peer, allowed
from supervisor.master.attached import Attached, Drop, Log, Route, Standby, Unroute


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def registry(promote_after: int = 0) -> tuple[Attached, Clock]:
    clock = Clock()
    attached = Attached(clock)
    attached.configure("blog", boot_s=10.0, silent_s=5.0, promote_after=promote_after)
    return attached, clock


def run(attached: Attached, clock: Clock, script: list[tuple]) -> list:
    """Events: ("join", key, tag), ("ready", key), ("heard", key), ("left", key),
    ("promote", tag), ("at", seconds since the start) (a tick then)."""
    actions = []
    start = clock.now
    for event, *args in script:
        if event == "join":
            key, tag = args
            actions += attached.joined(key, "blog", tag, pid=key, uid=65534, gid=65534)
        elif event == "ready":
            actions += attached.ready(*args)
        elif event == "heard":
            attached.heard(args[0], requests=1, connections=0)
        elif event == "left":
            actions += attached.left(args[0], "its channel closed")
        elif event == "promote":
            actions += attached.promote("blog", args[0])
        elif event == "at":
            clock.now = start + args[0]
            actions += attached.tick()
    return [action for action in actions if not isinstance(action, Log)]


CASES = [
    ("the first ready tag is live", [("join", 1, "blue"), ("ready", 1)], [Route(1)]),
    ("a second worker of the live tag serves", [("join", 1, "blue"), ("ready", 1), ("join", 2, "blue"),
                                                 ("ready", 2)], [Route(1), Route(2)]),
    ("another tag stands by, unrouted", [("join", 1, "blue"), ("ready", 1), ("join", 2, "green"), ("ready", 2)],
     [Route(1)]),
    ("a booting worker is not routed", [("join", 1, "blue")], []),
    ("promote routes the new tag before it unroutes the old",
     [("join", 1, "blue"), ("ready", 1), ("join", 2, "green"), ("ready", 2), ("promote", "green")],
     [Route(1), Route(2), Standby(2, False), Unroute(1), Standby(1, True)]),
    ("rollback is the same promote with the old tag",
     [("join", 1, "blue"), ("ready", 1), ("join", 2, "green"), ("ready", 2), ("promote", "green"),
      ("promote", "blue")],
     [Route(1), Route(2), Standby(2, False), Unroute(1), Standby(1, True),
      Route(1), Standby(1, False), Unroute(2), Standby(2, True)]),
    ("promoting the live tag does nothing", [("join", 1, "blue"), ("ready", 1), ("promote", "blue")], [Route(1)]),
    ("a worker not ready within boot_s is dropped", [("join", 1, "blue"), ("at", 9.9), ("at", 10.0)],
     [Drop(1, "was not ready within 10 s")]),
    ("a silent worker is dropped", [("join", 1, "blue"), ("ready", 1), ("at", 4.0), ("heard", 1), ("at", 8.9),
                                    ("at", 9.0)],
     [Route(1), Drop(1, "sent no heartbeat for 5 s")]),
    ("one that left is not dropped later", [("join", 1, "blue"), ("left", 1), ("at", 60)], []),
    ("a live tag whose workers all left gives way to one standing by",
     [("join", 1, "blue"), ("ready", 1), ("join", 2, "green"), ("ready", 2), ("join", 3, "green"), ("ready", 3),
      ("left", 1)],
     [Route(1), Route(2), Standby(2, False), Route(3), Standby(3, False)]),
    ("... or to the next tag with a ready worker", [("join", 1, "blue"), ("ready", 1), ("left", 1),
                                                    ("join", 2, "green"), ("ready", 2)],
     [Route(1), Route(2), Standby(2, False)]),
    ("... and so does one whose last worker went silent",
     [("join", 1, "blue"), ("ready", 1), ("join", 2, "green"), ("ready", 2), ("at", 4), ("heard", 2), ("at", 5)],
     [Route(1), Drop(1, "sent no heartbeat for 5 s"), Route(2), Standby(2, False)]),
    ("a dropped worker's ready is ignored", [("join", 1, "blue"), ("at", 10), ("ready", 1)],
     [Drop(1, "was not ready within 10 s")]),
]


@pytest.mark.parametrize("script,expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_events_give_these_actions(script, expected):
    attached, clock = registry()
    assert run(attached, clock, script) == expected


def test_attach_promote_switches_once_n_of_the_new_tag_are_ready():
    attached, clock = registry(promote_after=2)
    actions = run(attached, clock, [("join", 1, "blue"), ("ready", 1), ("join", 2, "green"), ("ready", 2)])
    assert actions == [Route(1)]
    assert attached.apps["blog"].live == "blue"
    actions = run(attached, clock, [("join", 3, "green"), ("ready", 3)])
    assert actions == [Route(2), Standby(2, False), Route(3), Standby(3, False), Unroute(1), Standby(1, True)]
    assert attached.apps["blog"].live == "green"


def test_promoting_a_tag_with_no_ready_worker_says_which_are_ready_and_changes_nothing():
    attached, clock = registry()
    run(attached, clock, [("join", 1, "blue"), ("ready", 1), ("join", 2, "green")])
    with pytest.raises(ValueError, match=r"no ready worker of app 'blog' has tag 'green' \(ready tags: 'blue'\)"):
        attached.promote("blog", "green")
    assert attached.apps["blog"].live == "blue"
    with pytest.raises(ValueError, match="takes no attached workers"):
        attached.promote("shop", "green")


def test_a_key_is_joined_once_and_only_for_an_app_that_takes_attached_workers():
    attached, _ = registry()
    attached.joined(1, "blog", "", pid=0, uid=0, gid=0)
    with pytest.raises(KeyError):
        attached.joined(1, "blog", "", pid=0, uid=0, gid=0)
    with pytest.raises(KeyError):
        attached.joined(2, "shop", "", pid=0, uid=0, gid=0)


def test_states_and_deadlines_follow_the_events():
    attached, clock = registry()
    run(attached, clock, [("join", 1, "blue"), ("join", 2, "green")])
    assert attached.next_deadline() == 110.0   # boot_s after joining
    run(attached, clock, [("ready", 1), ("ready", 2)])
    assert {w.key: w.state for w in attached.of_app("blog")} == {1: "serving", 2: "standby"}
    assert attached.next_deadline() == 105.0   # silent_s after its ready
    run(attached, clock, [("left", 1), ("left", 2)])
    assert attached.next_deadline() is None and attached.of_app("blog") == []


# -- who may attach (attach_points.allowed): this machine's users (www-data 33, nobody 65534) --

ALLOW_CASES = [
    ("the app's user by default", None, "nobody", Peer(10, 65534, 65534), None),
    ("no one else by default", None, "nobody", Peer(10, 33, 33), "uid 33 (gid 33) is not in the app's user (nobody)"),
    ("a uid", (33,), "nobody", Peer(10, 33, 33), None),
    ("a user's name", ("www-data",), "nobody", Peer(10, 33, 4000), None),
    ("a group, as the primary gid", ("@www-data",), "nobody", Peer(10, 4000, 33), None),
    ("a group it is not in", ("@www-data",), "nobody", Peer(10, 65534, 65534),
     "uid 65534 (gid 65534) is not in attach_allow ['@www-data']"),
    ("a name this system does not know matches no one", ("no-such-user", "@no-such-group"), "nobody",
     Peer(10, 65534, 65534), "uid 65534 (gid 65534) is not in attach_allow ['no-such-user', '@no-such-group']"),
    ("root is no exception", (33,), "nobody", Peer(1, 0, 0), "uid 0 (gid 0) is not in attach_allow [33]"),
    ("an empty list admits no one", (), "nobody", Peer(10, 65534, 65534), "uid 65534 (gid 65534) is not in attach_allow []"),
]


@pytest.mark.parametrize("allow,app_user,peer,refusal", [case[1:] for case in ALLOW_CASES],
                         ids=[case[0] for case in ALLOW_CASES])
def test_who_may_attach(allow, app_user, peer, refusal):
    assert allowed(allow, app_user, peer) == refusal


def test_an_app_that_no_longer_takes_attached_workers_drops_each_and_forgets_its_tag():
    attached, clock = registry()
    run(attached, clock, [("join", 1, "blue"), ("ready", 1), ("join", 2, "green")])
    actions = attached.forget_app("blog", "its app takes no attached workers now")
    assert [a for a in actions if not isinstance(a, Log)] == [Drop(1, "its app takes no attached workers now"),
                                                               Drop(2, "its app takes no attached workers now")]
    assert attached.of_app("blog") == [] and "blog" not in attached.apps and attached.next_deadline() is None
