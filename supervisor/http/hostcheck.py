"""Is this request for this app? Host routing decided per request, not per connection (pure).

On a `balance` listener shared by several apps, the balancer routes a connection by
its first request's Host (or TLS SNI). The requests after it on the same keep-alive
connection may name another host (a connection-pooling proxy sends every site's
requests down whatever connection is free): served by the app the connection went to,
app B's requests, cookies and all, would reach app A. So the worker checks each
request against the listener's routing, decided as the balancer decides it: the same
routing table (`balancer.process.routing_payload`, narrowed by `routes_for`), made into
the same `routing.HostTable` by the same `routing.build_routes`, and the host read from
the request by the same `routing.request_host`. A request the table gives to another
app, or to none (which the balancer would refuse), is misdirected: the server answers
421 and closes the connection, and the app never sees it. (A later change may hand
such a connection back to the balancer to be routed again instead.)

Promises:

* A listener served by one app has no `HostGate`: its requests are not looked at.
* `HostGate.misdirected` costs a look for the Host field and one bytes comparison
  when the Host is the one the connection's previous request passed with; the table
  is consulted (a dict lookup or a few) only when it changes.
"""
from __future__ import annotations

from collections.abc import Mapping

from supervisor.balancer import routing
from supervisor.balancer.routing import build_routes

__all__ = ["routes_for", "host_tables", "HostGate"]


def routes_for(payload: Mapping, app: str) -> dict:
    """The part of a routing table (`routing_payload`'s shape, which `messages.Routes`
    carries) that `app`'s workers check requests against: the `balance` listeners it
    shares with other apps, and those apps' routing. Plain data, for a WorkerSpec."""
    listeners = {name: tuple(apps) for name, apps in payload["listeners"].items()
                 if app in apps and len(apps) > 1}
    named = {other for apps in listeners.values() for other in apps}
    return {
        "listeners": listeners,
        "proxy": tuple(name for name in payload["proxy"] if name in listeners),
        "apps": {name: {"hosts": tuple(entry["hosts"]), "default": entry["default"],
                        "balance": entry["balance"]}
                 for name, entry in payload["apps"].items() if name in named},
    }


def host_tables(payload: Mapping, app: str) -> dict:
    """listener name -> its HostTable, for each listener of `payload` routed by host
    that serves `app` (ValueError on a table `routing.HostTable` refuses). An empty
    `payload` (a spec made without one) routes nothing."""
    if not payload:
        return {}
    return {name: route.hosts for name, route in build_routes(routes_for(payload, app)).items()
            if route.hosts is not None}


_UNSEEN = object()   # no request has passed yet


class HostGate:
    """One connection's check: is each of its requests for `app` under `table`?"""

    __slots__ = ("table", "app", "_passed")

    def __init__(self, table: routing.HostTable, app: str) -> None:
        self.table = table
        self.app = app
        self._passed = _UNSEEN   # the Host value of the last request that passed

    def misdirected(self, request) -> str | None:
        """None when `request` (an `http.protocol.Request`) is for this app; else its
        host as the log should show it, with the app it belongs to."""
        host_value = None
        for name, value in request.headers:
            if len(name) == 4 and name.lower() == b"host":
                host_value = value
                break
        target = request.target
        origin_form = target[:1] == b"/"   # the host is the Host field's (no authority in the target)
        if origin_form and host_value == self._passed:
            return None
        peek = routing.request_host(None if host_value is None else host_value.strip(b" \t"),
                                    target, 0 if request.version == "1.0" else 1)
        if peek.status == "invalid":
            return f"{host_value!r} ({peek.reason})"
        owner = self.table.match(peek.host)
        if owner != self.app:
            return f"{peek.host or '(none)'} (app {owner})" if owner else f"{peek.host or '(none)'} (no app)"
        if origin_form:
            self._passed = host_value
        return None
