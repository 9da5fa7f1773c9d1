"""The reload plan: one table of (old config, new config) -> what to open, close, start,
stop, restart and rescale, and why."""
from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import pytest

from supervisor.config.model import AppConfig, Config, ListenerConfig, MasterConfig
from supervisor.config.plan import Plan, diff
from supervisor.config.reader import BindAddress, from_mapping

WEB = ListenerConfig("web", BindAddress("tcp", host="127.0.0.1", port=8000))
API = ListenerConfig("api", BindAddress("tcp", host="127.0.0.1", port=9000))
SHARED = ListenerConfig("shared", BindAddress("unix", path="/run/s.sock"), mode="share")
BLOG = AppConfig("blog", "blog:app", ("web",), workers=2)
SHOP = AppConfig("shop", "shop:app", ("api",), workers=2)


def config(listeners=(WEB, API), apps=(BLOG, SHOP), master=MasterConfig()) -> Config:
    return Config("/etc/baton.toml", master, MappingProxyType({listener.name: listener for listener in listeners}),
                  MappingProxyType({app.name: app for app in apps}))


BASE = config()

# (id, new config, restart_all, expected plan fields; everything not named is "unchanged")
CASES = [
    ("no change", BASE, False, {}),
    ("bind change", config(listeners=(replace(WEB, bind=BindAddress("tcp", host="127.0.0.1", port=8001)), API)),
     False, dict(listeners_open=("web",), listeners_close=("web",), listeners_keep=("api",), routing_changed=True,
                 reasons={"listener web": ("bind",)})),
    ("backlog change", config(listeners=(WEB, replace(API, backlog=16))), False,
     dict(listeners_open=("api",), listeners_close=("api",), listeners_keep=("web",), routing_changed=True,
          reasons={"listener api": ("backlog",)})),
    ("mode change restarts the apps on it", config(listeners=(WEB, replace(API, mode="share"))), False,
     dict(listeners_open=("api",), listeners_close=("api",), listeners_keep=("web",), routing_changed=True,
          apps_restart=("shop",), apps_keep=("blog",),
          reasons={"listener api": ("mode",), "app shop": ("listener:api",)})),
    ("close a listener", config(listeners=(WEB,), apps=(BLOG,)), False,
     dict(listeners_close=("api",), listeners_keep=("web",), apps_stop=("shop",), apps_keep=("blog",),
          routing_changed=True)),
    ("add a listener", config(listeners=(WEB, API, SHARED)), False,
     dict(listeners_open=("shared",), listeners_keep=("web", "api"), routing_changed=True)),
    ("start app", config(apps=(BLOG, SHOP, replace(SHOP, name="wiki"))), False,
     dict(apps_start=("wiki",), routing_changed=True)),
    ("stop app", config(apps=(BLOG,)), False,
     dict(apps_stop=("shop",), apps_keep=("blog",), routing_changed=True)),
    ("rescale", config(apps=(BLOG, replace(SHOP, workers=4))), False,
     dict(apps_rescale={"shop": 4}, apps_keep=("blog",), reasons={"app shop": ("workers",)})),
    ("restart because user changed", config(apps=(replace(BLOG, user="www-data"), SHOP)), False,
     dict(apps_restart=("blog",), apps_keep=("shop",), reasons={"app blog": ("user",)})),
    ("restart because env changed", config(apps=(replace(BLOG, env=MappingProxyType({"A": "1"})), SHOP)), False,
     dict(apps_restart=("blog",), apps_keep=("shop",), reasons={"app blog": ("env",)})),
    ("restart because module changed", config(apps=(replace(BLOG, module="blog2:app"), SHOP)), False,
     dict(apps_restart=("blog",), apps_keep=("shop",), reasons={"app blog": ("module",)})),
    ("restart because threads changed", config(apps=(replace(BLOG, threads=8), SHOP)), False,
     dict(apps_restart=("blog",), apps_keep=("shop",), reasons={"app blog": ("threads",)})),
    ("restart with a new count is not a rescale", config(apps=(replace(BLOG, threads=8, workers=5), SHOP)), False,
     dict(apps_restart=("blog",), apps_keep=("shop",), reasons={"app blog": ("workers", "threads")})),
    ("restart because the app moved to another listener", config(apps=(replace(BLOG, listeners=("api",)), SHOP)),
     False, dict(apps_restart=("blog",), apps_keep=("shop",), routing_changed=True,
                 reasons={"app blog": ("listeners",)})),
    ("hosts change is routing only", config(apps=(replace(BLOG, hosts=("blog.example",)), SHOP)), False,
     dict(routing_changed=True, reasons={"app blog": ("hosts",)})),
    ("balance and default are routing only", config(apps=(replace(BLOG, balance="round-robin", default=True), SHOP)),
     False, dict(routing_changed=True, reasons={"app blog": ("default", "balance")})),
    ("reload_on is the watcher's business", config(apps=(replace(BLOG, reload_on=("/srv/*.py",)), SHOP)), False,
     dict(reasons={"app blog": ("reload_on",)})),
    ("restart_all", BASE, True,
     dict(apps_restart=("blog", "shop"), apps_keep=(),
          reasons={"app blog": ("restart_all",), "app shop": ("restart_all",)})),
    ("restart_all also rescales through the restart",
     config(apps=(BLOG, replace(SHOP, workers=3), replace(SHOP, name="wiki"))), True,
     dict(apps_restart=("blog", "shop"), apps_keep=(), apps_start=("wiki",), routing_changed=True,
          reasons={"app blog": ("restart_all",), "app shop": ("workers", "restart_all")})),
    ("master timeouts restart nothing", config(master=MasterConfig(graceful_timeout=1, boot_timeout=2)), False,
     dict(master_changed=("graceful_timeout", "boot_timeout"))),
]

SHARED_BASE = config(listeners=(WEB, SHARED), apps=(BLOG, replace(SHOP, listeners=("shared", "web"), hosts=("s",)),
                                                   replace(BLOG, name="wiki", listeners=("shared",))))
SHARED_BLOG = replace(BLOG, hosts=())
SHARED_CASES = [
    ("a re-created shared listener restarts the apps holding it",
     config(listeners=(WEB, replace(SHARED, backlog=10)), apps=SHARED_BASE.apps.values()), False,
     dict(listeners_open=("shared",), listeners_close=("shared",), listeners_keep=("web",), routing_changed=True,
          apps_restart=("shop", "wiki"), apps_keep=("blog",),
          reasons={"listener shared": ("backlog",), "app shop": ("listener:shared",),
                   "app wiki": ("listener:shared",)})),
    ("proxy_protocol on a shared listener keeps the socket, restarts its apps",
     config(listeners=(WEB, replace(SHARED, proxy_protocol=True)), apps=SHARED_BASE.apps.values()), False,
     dict(listeners_keep=("web", "shared"), routing_changed=True, apps_restart=("shop", "wiki"), apps_keep=("blog",),
          reasons={"listener shared": ("proxy_protocol",), "app shop": ("listener:shared",),
                   "app wiki": ("listener:shared",)})),
    ("proxy_allow_ips on a balance listener restarts its apps (their workers check the PROXY peer)",
     config(listeners=(replace(WEB, proxy_allow_ips=("10.0.0.0/8",)), SHARED), apps=SHARED_BASE.apps.values()), False,
     dict(apps_restart=("blog", "shop"), apps_keep=("wiki",),
          reasons={"listener web": ("proxy_allow_ips",), "app blog": ("listener:web",),
                   "app shop": ("listener:web",)})),
    ("a shared UNIX listener's file permissions are applied to its live file: no app restarts",
     config(listeners=(WEB, replace(SHARED, socket_mode=0o600, socket_group="www-data")),
            apps=SHARED_BASE.apps.values()), False,
     dict(listeners_keep=("web", "shared"), apps_keep=("blog", "shop", "wiki"),
          reasons={"listener shared": ("socket_mode", "socket_group")})),
    ("a re-created balance listener only re-routes",
     config(listeners=(replace(WEB, bind=BindAddress("unix", path="/run/w.sock")), SHARED),
            apps=SHARED_BASE.apps.values()), False,
     dict(listeners_open=("web",), listeners_close=("web",), listeners_keep=("shared",), routing_changed=True,
          reasons={"listener web": ("bind",)})),
]


def expected_plan(old: Config, new: Config, fields: dict) -> dict:
    """The plan fields `fields` names; everything else is "nothing happens"."""
    kept_apps = tuple(name for name in new.apps if name in old.apps)
    defaults = dict(listeners_open=(), listeners_close=(), listeners_keep=tuple(new.listeners), apps_start=(),
                    apps_stop=(), apps_restart=(), apps_rescale={}, apps_keep=kept_apps, routing_changed=False,
                    master_changed=(), reasons={})
    return {**defaults, **fields}


def actual(plan: Plan) -> dict:
    return dict(listeners_open=plan.listeners_open, listeners_close=plan.listeners_close,
                listeners_keep=plan.listeners_keep, apps_start=plan.apps_start, apps_stop=plan.apps_stop,
                apps_restart=plan.apps_restart, apps_rescale=dict(plan.apps_rescale), apps_keep=plan.apps_keep,
                routing_changed=plan.routing_changed, master_changed=plan.master_changed,
                reasons=dict(plan.reasons))


@pytest.mark.parametrize("old, new, restart_all, fields",
                         [(BASE, *case[1:]) for case in CASES] + [(SHARED_BASE, *case[1:]) for case in SHARED_CASES],
                         ids=[case[0] for case in CASES + SHARED_CASES])
def test_diff(old, new, restart_all, fields):
    plan = diff(old, new, restart_all=restart_all)
    assert actual(plan) == expected_plan(old, new, fields)
    assert plan.empty == (fields == {})


def test_every_app_and_listener_lands_in_exactly_one_list():
    for old, case in [(BASE, c) for c in CASES] + [(SHARED_BASE, c) for c in SHARED_CASES]:
        plan = diff(old, case[1], restart_all=case[2])
        apps = [*plan.apps_start, *plan.apps_stop, *plan.apps_restart, *plan.apps_rescale, *plan.apps_keep]
        assert sorted(apps) == sorted(set(old.apps) | set(case[1].apps)), case[0]
        recreated = set(plan.listeners_open) & set(plan.listeners_close)
        listeners = [*plan.listeners_open, *plan.listeners_close, *plan.listeners_keep]
        assert sorted(listeners) == sorted([*(set(old.listeners) | set(case[1].listeners)), *recreated]), case[0]
        assert not recreated & set(plan.listeners_keep), case[0]


def test_describe_says_what_and_why():
    new = config(listeners=(replace(WEB, bind=BindAddress("tcp", host="127.0.0.1", port=8001)),
                            replace(SHARED, proxy_protocol=True)),
                 apps=(replace(BLOG, user="www-data", env=MappingProxyType({"A": "1"})),
                       replace(SHOP, listeners=("web",), workers=2, hosts=("shop.example",)),
                       replace(SHOP, name="wiki", listeners=("shared",), workers=3)),
                 master=MasterConfig(graceful_timeout=5))
    old = config(listeners=(WEB, API, SHARED),
                 apps=(BLOG, replace(SHOP, listeners=("web",), workers=2, hosts=("shop.example",), default=True),
                       replace(SHOP, name="wiki", listeners=("shared",), workers=1),
                       replace(SHOP, name="old", listeners=("api",))))
    # wiki's listener changed (proxy_protocol, shared mode): restarted with 3 workers, not rescaled.
    assert diff(old, new).describe() == [
        "close listener api (127.0.0.1:9000)",
        "re-create listener web (127.0.0.1:8000 -> 127.0.0.1:8001): bind changed",
        "update listener shared: proxy_protocol changed",
        "stop app old",
        "restart app blog: user, env changed",
        "restart app wiki: workers changed; listener shared changed",
        "update app shop: default changed",
        "new routing table for the balancer",
        "master: graceful_timeout changed",
    ]
    rescaled = diff(BASE, config(apps=(BLOG, replace(SHOP, workers=4))))
    assert rescaled.describe() == ["rescale app shop: 2 -> 4 workers"]
    rehosted = diff(BASE, config(apps=(BLOG, replace(SHOP, workers=4, hosts=("shop.example",)))))
    assert rehosted.describe() == ["rescale app shop: 2 -> 4 workers", "update app shop: hosts changed",
                                   "new routing table for the balancer"]
    assert diff(BASE, config(listeners=(WEB, API, SHARED))).describe() == [
        "open listener shared (unix:/run/s.sock)", "new routing table for the balancer"]
    assert diff(BASE, BASE, restart_all=True).describe() == [
        "restart app blog: restart of every app requested", "restart app shop: restart of every app requested"]
    assert diff(BASE, BASE).describe() == ["no change"]


def test_diff_of_loaded_configs(tmp_path):
    def load(workers: int, user_env: str) -> Config:
        data = {"listeners": {"web": {"bind": "unix:web.sock"}},
                "apps": {"blog": {"module": "blog:app", "listeners": ["web"], "workers": workers,
                                  "env": {"MODE": user_env}}}}
        return from_mapping(data, None, running_as_root=False, base_dir=str(tmp_path))
    assert diff(load(1, "a"), load(1, "a")).empty
    assert dict(diff(load(1, "a"), load(3, "a")).apps_rescale) == {"blog": 3}
    assert diff(load(1, "a"), load(3, "b")).apps_restart == ("blog",)


def test_every_master_setting_is_either_applied_live_or_waits_for_an_upgrade():
    from dataclasses import fields

    from supervisor.config.model import MasterConfig
    from supervisor.config.plan import MASTER_AFTER_UPGRADE, MASTER_LIVE
    names = [f.name for f in fields(MasterConfig)]
    assert sorted(MASTER_LIVE + MASTER_AFTER_UPGRADE) == sorted(names)
    assert not set(MASTER_LIVE) & set(MASTER_AFTER_UPGRADE)
