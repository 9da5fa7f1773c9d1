"""The master's listening sockets, by name: shared ones, per-worker SO_REUSEPORT ones,
systemd's inherited fds and the health endpoint.

A `share` or `balance` listener is one socket the master holds for its whole life (the
workers or the balancer get copies). A `reuseport` listener is one socket per
(listener, app, worker index): a replacement worker inherits its predecessor's
socket, accept queue and all, and the socket is closed only when no worker of that
index will be started again.
"""
from __future__ import annotations

import socket

from supervisor.config.model import AppConfig, Config, ListenerConfig
from supervisor.system import activation
from supervisor.system import listeners as listeners_mod


class Sockets:
    def __init__(self, inherited: dict[str, int]):
        self.inherited = inherited                     # systemd's, open for the master's life
        self.listening: dict[str, socket.socket] = {}
        self.reuseport: dict[tuple[str, str, int], socket.socket] = {}
        self.health: socket.socket | None = None

    def open_all(self, config: Config) -> None:
        self.listening = listeners_mod.open_all(config.listeners, inherited=self.inherited)

    def adopt(self, config: Config, listening: dict[str, socket.socket],
              reuseport: dict[tuple[str, str, int], socket.socket], health: socket.socket | None) -> None:
        """Take over a running master's sockets (an upgrade); open what it did not have."""
        for name in [n for n in listening if n not in config.listeners]:
            listening.pop(name).close()
        missing = {name: listener for name, listener in config.listeners.items()
                   if name not in listening and listener.mode != "reuseport"}
        self.listening = {**listening, **listeners_mod.open_all(missing, inherited=self.inherited)}
        self.reuseport = reuseport
        self.health = health

    def open_health(self, config: Config) -> bool:
        """Open the health endpoint if the config names one and it is not open."""
        address = config.master.health
        if address is None or self.health is not None:
            return False
        self.health = listeners_mod.open_listener(ListenerConfig("health", address))
        return True

    def open_new(self, config: Config, names: tuple[str, ...]) -> dict[str, socket.socket]:
        """Open the listeners a reload adds (not yet kept: `commit` them). Raises
        ListenerError or PrivilegeError, having closed what it opened."""
        opened: dict[str, socket.socket] = {}
        try:
            for name in names:
                if config.listeners[name].mode != "reuseport":
                    opened[name] = listeners_mod.open_listener(config.listeners[name], inherited=self.inherited)
        except BaseException:
            for sock in opened.values():
                sock.close()
            raise
        return opened

    def commit(self, closed: tuple[str, ...], opened: dict[str, socket.socket]) -> None:
        for name in closed:
            sock = self.listening.pop(name, None)
            if sock is not None:
                sock.close()   # workers and the balancer keep their own copies until they drain
            for key in [k for k in self.reuseport if k[0] == name]:
                self.reuseport.pop(key).close()
        self.listening.update(opened)

    def for_worker(self, config: Config, app: AppConfig, index: int) -> dict[str, socket.socket]:
        """The sockets a worker of `app` accepts on itself (share and reuseport modes)."""
        sockets = {}
        for name in app.listeners:
            listener = config.listeners[name]
            if listener.mode == "share":
                sockets[name] = self.listening[name]
            elif listener.mode == "reuseport":
                key = (name, app.name, index)
                if key not in self.reuseport:
                    self.reuseport[key] = listeners_mod.open_listener(listener, reuseport=True)
                sockets[name] = self.reuseport[key]
        return sockets

    def balanced(self, config: Config, only: dict[str, socket.socket] | None = None) -> dict[str, socket.socket]:
        """The `balance` listeners, which the balancer accepts on."""
        source = self.listening if only is None else only
        return {name: sock for name, sock in source.items() if config.listeners[name].mode == "balance"}

    def release_slot(self, app: str, index: int) -> None:
        for key in [k for k in self.reuseport if k[1] == app and k[2] == index]:
            self.reuseport.pop(key).close()

    def close(self, config: Config) -> None:
        listeners_mod.close_all(self.listening, config.listeners)
        activation.close(self.inherited)
        for sock in self.reuseport.values():
            sock.close()
        self.reuseport.clear()
        if self.health is not None:
            self.health.close()
            self.health = None
