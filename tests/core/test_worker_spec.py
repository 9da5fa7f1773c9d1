"""A WorkerSpec as the worker's new interpreter receives it: plain data, generically."""
from __future__ import annotations

import json
import socket
from dataclasses import fields
from types import MappingProxyType

import pytest

from supervisor.config.model import AppConfig
from supervisor.system.privileges import Identity
from supervisor.worker import entry
from supervisor.worker.process import WorkerSpec


@pytest.fixture
def spec():
    channel_end, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener = socket.socket()
    app = AppConfig(name="blog", module="blog:app", listeners=("web",), threads=4,
                    env=MappingProxyType({"SECRET": "s", "$fd": "not an fd", "tag": "list"}),
                    forwarded_allow_ips=("127.0.0.1",), timeout=None)
    yield WorkerSpec(app=app, index=2, generation=7, identity=Identity("www-data", 33, 33),
                     graceful_timeout_s=30.0, master_pid=1, heartbeat_s=1.0, channel=channel_end,
                     listeners={"web": listener}, proxy_listeners=frozenset({"b", "a"}), log_fds=(5, -1))
    for sock in (channel_end, other, listener):
        sock.close()


def test_every_field_but_logs_arrives_as_plain_data(spec):
    wire = json.loads(json.dumps(entry.encode_spec(spec)))   # what the memfd carries
    assert set(wire) == {f.name for f in fields(WorkerSpec)} - {"logs"}
    got = entry.decode_spec(wire)
    try:
        assert type(got.app) is entry.Record and type(got.identity) is entry.Record
        assert vars(got.app) == {f.name: _plain(getattr(spec.app, f.name)) for f in fields(AppConfig)}
        assert got.app.env == {"SECRET": "s", "$fd": "not an fd", "tag": "list"}   # a user's string stays one
        assert got.identity.name == "www-data" and got.identity.uid == 33
        assert (got.index, got.generation, got.graceful_timeout_s, got.app.timeout) == (2, 7, 30.0, None)
        assert got.proxy_listeners == ("a", "b") and got.log_fds == (5, -1)
        assert got.channel.fileno() == spec.channel.fileno()
        assert got.listeners["web"].fileno() == spec.listeners["web"].fileno()
        assert got.balancers == () and got.logs is None
    finally:
        for sock in (got.channel, *got.listeners.values()):
            sock.detach()   # the same fds as the fixture's: closed once, there


def _plain(value):
    if isinstance(value, MappingProxyType):
        return dict(value)
    return value


def test_a_field_that_is_not_plain_data_is_named(spec):
    spec.access_log_format = {"web": object()}
    with pytest.raises(TypeError, match=r"WorkerSpec.access_log_format: a value of type object is not plain data"):
        entry.encode_spec(spec)
