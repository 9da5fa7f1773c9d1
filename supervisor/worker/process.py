"""The worker process: import the app, say READY, serve.

A worker is a fresh interpreter (see `supervisor.worker.entry`), so it holds nothing
of the master's but its own app's `WorkerSpec`. Before the exec it became the app's
user and arranged to die with the master; `main` then sets the app's directory and
paths, and only then imports the app. The master hears READY or BOOT_FAILED (with the
traceback) over the channel; after that the channel carries STOP. Its log lines go to
pipes the master reads (stderr, and the access pipe), never to a log file.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import sys
import traceback
import weakref

import setproctitle

from supervisor.http import hostcheck
from supervisor.http.server import Server, ServerSettings
from supervisor.ipc import channel
from supervisor.ipc.channel import ChannelClosed
from supervisor.ipc.messages import (
    PREFETCH,
    REFUSED_MAX,
    REPORT_MAX_IDS,
    TRACEBACK_MAX,
    BootFailed,
    Conn,
    HandBack,
    Heartbeat,
    Message,
    MessageError,
    Ready,
    Relink,
    Report,
    Routes,
    Standby,
    Stop,
)
from supervisor.system import spawn
from supervisor.system.loop import Loop
from supervisor.worker import access, appload, hooks, timeouts, tlsboot
from supervisor.worker.spec import EXIT_BOOT_FAILED, WorkerSpec
from supervisor.worker.stats import StatsSender

_STREAM = int(socket.SOCK_STREAM)
# Standing by, every kept connection goes back to the balancer this soon after its
# response: at once, in effect, so a client sending without a pause moves too.
STANDBY_PARK_S = 0.0001
SEND_WAIT_S = 1.0  # how long a worker waits for room in a busy balancer's channel


def title(spec: WorkerSpec) -> str:
    return f"baton: worker {spec.app.name}#{spec.index} gen {spec.generation} ({spec.identity.name})"


def main(spec: WorkerSpec) -> int:
    answerer = timeouts.Answerer()
    booted = boot_or_fail(spec, f"worker {spec.app.name}#{spec.index}", lambda: _boot(spec, answerer))
    if booted is None:
        return EXIT_BOOT_FAILED
    app, app_hooks = booted
    return Worker(spec, app, app_hooks, answerer).serve()


def boot_or_fail(spec: WorkerSpec, who: str, boot):
    """`boot()`'s result; or, if it raises anything, None, with the traceback logged
    as `who`'s and sent to the master (BOOT_FAILED)."""
    try:
        return boot()
    except BaseException as exc:
        # A permission is the usual cause under a root master (nobody cannot read a
        # project in /root): the traceback alone names a symptom, the hint the cure.
        text = traceback.format_exc() + access.boot_hint(spec, exc)
        spec.logs.error.error("%s failed to boot:\n%s", who, text.rstrip())
        try:
            channel.send(spec.channel, BootFailed(traceback=text[-TRACEBACK_MAX:]))
        except OSError:
            pass
        return None


def _boot(spec: WorkerSpec, answerer: timeouts.Answerer):
    """Runs in the new interpreter, as the app's user (dropped to before the exec),
    with the app's environment (given to the exec). Returns the app, its request
    hooks around it, and its hooks."""
    app = spec.app
    enter_app_environment(app)
    # Set before the exec already (after the privilege drop, which clears it); asked
    # again because an exec of a set-id interpreter would clear it too, and the check
    # against the master's pid is what closes the race with its death.
    if spec.master_pid:   # 0: an attached worker, whose master is not its parent
        spawn.die_with_parent(spec.master_pid)
    setproctitle.setproctitle(title(spec))
    # A hung worker is sent SIGABRT: every thread's stack goes to stderr, a pipe to the
    # master, which writes it to the error log (then its clients are answered: timeouts).
    answerer.install()
    spec.tls_context = tlsboot.load(spec, spec.logs.error)   # before app code: it never sees the memfds
    app_hooks = hooks.Hooks.load(app)
    info = worker_info(spec)
    if app_hooks.post_fork is not None:
        app_hooks.post_fork(info)
    wsgi_app = appload.load(app.module)
    if app_hooks.post_worker_init is not None:
        app_hooks.post_worker_init(info)
    return app_hooks.wrap(wsgi_app, spec.logs.error), app_hooks


def enter_app_environment(app) -> None:
    """The app's chdir, umask and import path, as its code expects them (a worker's,
    or a template's before it imports the app)."""
    if app.chdir:
        os.chdir(app.chdir)
    if app.umask is not None:
        os.umask(app.umask)
    for path in reversed(app.pythonpath):
        sys.path.insert(0, path)
    if app.chdir and app.chdir not in sys.path:
        sys.path.insert(0, app.chdir)


def worker_info(spec: WorkerSpec) -> hooks.WorkerInfo:
    return hooks.WorkerInfo(app=spec.app.name, index=spec.index, generation=spec.generation,
                            pid=os.getpid(), user=spec.identity.name)


class Worker:
    """A booted worker: an HTTP server, the master channel (and the balancer's),
    signals and the heartbeat, all on one event loop."""

    _SIGNALS = {
        signal.SIGTERM: "stop_graceful",
        signal.SIGINT: "stop_quick",
        signal.SIGQUIT: "stop_quick",
    }

    def __init__(self, spec: WorkerSpec, app, app_hooks: hooks.Hooks | None = None,
                 answerer: timeouts.Answerer | None = None):
        self.spec = spec
        self.hooks = app_hooks
        self.answerer = answerer
        self.loop = Loop()
        settings = ServerSettings(
            threads=spec.app.threads,
            keepalive_s=spec.app.keepalive,
            header_timeout_s=spec.app.header_timeout,
            limit_request_line=spec.app.limit_request_line,
            limit_request_fields=spec.app.limit_request_fields,
            limit_request_field_size=spec.app.limit_request_field_size,
            max_body_size=spec.app.max_body_size or None,   # 0: no limit
            buffer_body=spec.app.buffer_body,
            forwarded_allow_ips=spec.app.forwarded_allow_ips,
            forwarded_header=spec.app.forwarded_header,
            secure_scheme_headers=spec.app.secure_scheme_headers,
            write_timeout_s=spec.app.write_timeout,
            park_after_s=spec.app.park_after,
        )
        self.server = Server(app, list(spec.listeners.values()), settings,
                             spec.logs.error, spec.logs.access, listener_names=list(spec.listeners),
                             proxy_protocol_fds=frozenset(sock.fileno() for name, sock in spec.listeners.items()
                                                          if name in spec.proxy_listeners),
                             loop=self.loop, access_format=spec.logs.access_line,
                             proxy_allow_ips=spec.proxy_allow_ips, app_name=spec.app.name,
                             host_tables=hostcheck.host_tables(spec.host_routes, spec.app.name),
                             tls_context=spec.tls_context, tls_listeners=spec.tls_listeners,
                             redirect_https=spec.redirect_https)
        tlsboot.keep_rotating(spec, self.loop, spec.logs.error)
        # One link per balancer; a connection is handed back to the one that gave it
        # (only that one holds its record: any other would take the hand-back for a lie
        # and drop our link), one we accepted ourselves to the first.
        self.origins: weakref.WeakKeyDictionary[socket.socket, BalancerLink] = weakref.WeakKeyDictionary()
        self.links = [self._new_link(sock) for sock in spec.balancers]
        self.link = self.links[0] if self.links else None

    def _new_link(self, sock: socket.socket) -> BalancerLink:
        server = _FromLink(self.server, self.origins)
        server.link = link = BalancerLink(sock, server, self.spec.logs.error, self.loop)
        return link

    def serve(self) -> int:
        loop = self.loop
        for signum in self._SIGNALS:
            loop.on_signal(signum, self._on_signal)
        loop.register(self.spec.channel, self._on_channel)
        for link in self.links:
            loop.register(link.sock, link.on_readable)
        channel.send(self.spec.channel, Ready(pid=os.getpid()))
        self.spec.channel.setblocking(False)  # a busy master must never stall the serving loop
        loop.every(self.spec.heartbeat_s, self._heartbeat)
        loop.after_events(self._report)
        stats = StatsSender(loop, self.spec.channel, self.server.stats)
        loop.after_events(stats.after_events)
        if self.answerer is not None:
            self.answerer.start(self.server, self.spec.logs.error)   # after the loop's signals
        try:
            self.server.run()
        finally:
            self._report()  # connections the shutdown closed
            stats.flush()
            if self.answerer is not None:
                self.answerer.close()
            loop.close()
        self._worker_exit()
        return 0

    def _worker_exit(self) -> None:
        hook = self.hooks.worker_exit if self.hooks is not None else None
        if hook is None:
            return
        try:
            hook(worker_info(self.spec))
        except Exception:
            self.spec.logs.error.exception("worker_exit hook failed")

    def _report(self) -> None:
        for link in self.links:
            link.report()

    def _relink(self, index: int, fd: int) -> None:
        """Balancer `index` was replaced: talk to the new one over the fresh channel `fd`
        (the master keeps the old channel's other end, so it never reads as closed).
        Connections the old one gave stay ours; a hand-back or park of one goes to the
        old link, whose channel is closed, so it is closed instead: the new balancer
        holds no record of it and would take it for a lie."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            os.close(fd)
            self.spec.logs.error.error("bad channel from master for balancer %d: %s", index, exc)
            return
        if not 0 <= index < len(self.links) or sock.type != socket.SOCK_SEQPACKET:
            sock.close()
            self.spec.logs.error.error("bad channel from master for balancer %d", index)
            return
        old = self.links[index]
        # Connections the old one sent before it died are ours (it held them until our
        # acknowledgement, which it never reads): take them before the channel goes.
        while self.loop.registered(old.sock) and select.select([old.sock], [], [], 0)[0]:
            old.on_readable()
        if old.sock.fileno() >= 0:
            if self.loop.registered(old.sock):
                self.loop.unregister(old.sock)
            old.sock.close()
        self.links[index] = link = self._new_link(sock)
        self.loop.register(sock, link.on_readable)
        if index == 0:
            self.link = link

    def _heartbeat(self) -> None:
        """Sent from the serving loop itself, so a loop stuck in an app call goes silent."""
        server = self.server
        try:
            channel.send(self.spec.channel, Heartbeat(
                requests=server.requests_served, connections=server.active_connections,
                busy=server.busy_threads, oldest_s=server.oldest_request_age()))
        except BlockingIOError:
            pass  # the master is behind; the next beat will do
        except OSError:
            self.server.stop(graceful=False)  # the master is gone

    def stop_graceful(self) -> None:
        self.server.stop(graceful=True)

    def stop_quick(self) -> None:
        self.server.stop(graceful=False)

    def _on_signal(self, signum: int) -> None:
        getattr(self, self._SIGNALS[signum])()

    def _on_channel(self) -> None:
        try:
            message, fds = channel.receive(self.spec.channel)
        except BlockingIOError:
            return
        except (ChannelClosed, ConnectionError):
            # The master is gone; the death signal normally beats us to this. An attached
            # worker has none: it lets its running requests finish.
            self.server.stop(graceful=not self.spec.master_pid)
            return
        except MessageError as exc:
            self.spec.logs.error.error("bad message from master: %s", exc)
            return
        if type(message) is Relink:   # with its one fd
            self._relink(message.index, fds[0])
            return
        for fd in fds:
            os.close(fd)
        if type(message) is Routes:   # a reload changed the routing without restarting us
            try:
                self.server.set_host_tables(hostcheck.host_tables(message.routes, self.spec.app.name))
            except ValueError as exc:
                self.spec.logs.error.error("bad routing table from master: %s", exc)
            return
        if type(message) is Standby:   # an attached worker's tag stands by, or serves again
            self.server.set_park_after(STANDBY_PARK_S if message.standby else self.spec.app.park_after)
            return
        if type(message) is Stop:
            if message.graceful and message.handback and self.link is not None:
                self.server.hand_back_with(self._hand_back)
            self.server.stop(graceful=message.graceful)

    def _hand_back(self, sock: socket.socket, unparsed: bytes, peer, listener: str) -> None:
        try:
            link = self.origins.pop(sock, self.link)
        except TypeError:   # a raw socket the server accepted itself (share, reuseport): no balancer's
            link = self.link
        link.hand_back(sock, unparsed, peer, listener)


class _FromLink:
    """The server as one BalancerLink sees it: each connection it adds is noted as that
    link's (`origins`), for the hand-back; everything else is the server's."""

    def __init__(self, server: Server, origins: weakref.WeakKeyDictionary):
        self._server = server
        self._origins = origins
        self.link: BalancerLink | None = None

    def add_connection(self, sock: socket.socket, *args, **kwargs) -> None:
        self._origins[sock] = self.link
        self._server.add_connection(sock, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._server, name)


class BalancerLink:
    """The worker's end of its channel to one balancer: connections in, load out. (With
    several balancers a worker has one link each; a link knows only its own.)

    What the balancer must hear (which connections we took, so it can drop its copies;
    which ended, so its counts stay right) goes out in REPORT messages that gather many
    events, because every message wakes the balancer: the connections taken and the
    ones that ended are reported once per loop iteration, after its events (`report`
    is the loop's after-events callback), or sooner when we become free. A connection
    is acknowledged once its first request starts (or it ends, or is parked) rather
    than when it is read from the channel: until then the balancer keeps its copy and
    counts it, and should we die, passes it to another worker if we never touched it
    (see the balancer's links.py). So a connection served inline is often
    acknowledged in the same REPORT that says it ended. So the balancer hears of a close up to one loop
    iteration late, and counts a worker busy with a long inline call a little high.

    Busy threads, as the balancer must count them to send a connection only to a worker
    that can serve it now: every REPORT says how many threads we have and how many are
    busy (the threads alone: the connections we hold unacknowledged, claimed, each a
    request about to run, the balancer counts itself). Each is read at once, and stays
    claimed until its first request ran (inline) or holds a pool thread, or that read
    left a request partly here (a slow client holds no thread), or it closes or is
    parked (a silent one is, after `park_after`; with parking off it is not claimed
    past that first read). A REPORT goes out the moment we are free again while the
    last one said we were not (claims released, a pool thread done), and the moment
    we have room for connections ahead (busy below threads + PREFETCH) while the
    last one said we had none, and only then: a worker the
    balancer already believes free says nothing, so a request on a connection that
    stayed here (a hot keep-alive one) costs no message. Such a request is the one the
    balancer does not see; a connection idle past `park_after` is parked (handed back
    without retiring, `keepalive_s` set), so its next request comes through the
    balancer, which counts it.

    A CONN whose fd did not reach us (we are at our fd limit) is reported `refused`, so
    the balancer passes it to another worker. The balancer shutting our channel down
    means it dropped us (it believes nothing more from this worker): we stop, and the
    master replaces us. A handed-back connection goes before the news that it ended
    here, which the balancer reads as its end."""

    def __init__(self, sock: socket.socket, server: Server, log, loop: Loop):
        self.sock = sock
        self.server = server
        self.log = log
        self.loop = loop
        self.acked: list[int] = []    # taken since the last report
        self.closed: list[int] = []   # ended since the last report
        self.refused: list[int] = []  # arrived without their fd since the last report
        self.threads = max(1, server.settings.threads)
        self.claimed: set[int] = set()   # acknowledged, their first request not started
        self.told_busy = 0               # what the last report said
        self.room_news = False           # we have room the balancer has not heard of
        sock.setblocking(False)
        server.watch_free(self._maybe_free)
        try:   # how many threads we have, before the first connection (the balancer counts one till then)
            channel.send(sock, Report(busy=0, acked=(), closed=(), threads=self.threads))
        except OSError:
            pass   # the acknowledging reports say it too

    def on_readable(self) -> None:
        # Acknowledged in the loop iteration's REPORT (`report`, after its events), with
        # whatever else it has to say: often the same connections' ends. Until then the
        # balancer keeps its copies, and should we die, it reads back from a copy of our
        # channel end what we never read, and passes on only that. One is read only when
        # the one before it was served (inline) or went to a thread: while we are in a
        # slow request, the rest stay unread, and the balancer may take them back for a
        # worker that is free (its core's promise 2c).
        for _ in range(64):
            taken = self._next_connection()
            if taken is None:
                return
            message, fd = taken
            self.claimed.add(message.id)
            self._serve(message, fd)

    def _next_connection(self) -> tuple[Conn, int] | None:
        """The next CONN in the channel, with its one fd (what else comes is noted or
        dropped on the way); None when there is none now."""
        for _ in range(64):
            try:
                message, fds = channel.receive(self.sock)
            except BlockingIOError:
                return None
            except (ChannelClosed, ConnectionError):
                self.loop.unregister(self.sock)
                self.log.error("the balancer dropped this worker's link; stopping")
                self.server.stop(graceful=True)
                return None
            except channel.Truncated as exc:
                if type(exc.message) is Conn:
                    if not self.refused:   # one line per report, not per connection
                        self.log.warning("could not take a connection from the balancer: %s;"
                                         " it goes to another worker", exc)
                    self.refused.append(exc.message.id)
                continue
            except MessageError as exc:
                self.log.error("bad message from the balancer: %s", exc)
                continue
            if type(message) is not Conn:
                for fd in fds:
                    os.close(fd)
                continue
            return message, fds[0]
        return None   # (the level-triggered loop comes back for the rest)

    def _serve(self, conn: Conn, fd: int) -> None:
        conn_id, peer, listener = conn.id, conn.peer, conn.listener
        # The type and protocol given, the kernel is asked only the family (two
        # getsockopt calls less per connection); the balancer sends only stream sockets.
        self.server.add_connection(socket.socket(-1, _STREAM, 0, fd), peer, listener,
                                   initial_bytes=conn.data,
                                   on_close=lambda: self._ended(conn_id),
                                   proxy_protocol=conn.proxy,
                                   on_park=lambda sock, left_s: self._park(conn_id, sock, peer, listener, left_s),
                                   on_started=lambda: self._unclaim(conn_id))

    def _ended(self, conn_id: int) -> None:
        # No REPORT from here, even if we are free now: a connection handed back or
        # parked ends here just before its HANDBACK goes, and a REPORT saying it ended
        # must not overtake that (the balancer would have dropped its record, and take
        # the hand-back for a lie). The iteration's REPORT says it, and that we are free.
        self.closed.append(conn_id)
        if conn_id in self.claimed:   # it ends before any request started: ours to close
            self.claimed.discard(conn_id)
            self.acked.append(conn_id)

    def _unclaim(self, conn_id: int) -> None:
        """Its first request started (or cannot wait here unread): from now on it is
        ours, and the balancer may drop its copy."""
        claimed = self.claimed
        if conn_id in claimed:
            claimed.discard(conn_id)
            self.acked.append(conn_id)
            self._maybe_free()

    def _maybe_free(self) -> None:
        """Say we have room, if the balancer was last told we had none: below our threads
        (free), or below our threads plus PREFETCH (room ahead; see the class)."""
        told, threads = self.told_busy, self.threads
        if told >= threads and self.server.busy_threads + len(self.claimed) < min(told, threads + PREFETCH):
            # Said by the iteration's REPORT (`report`, after its events; this is always
            # on the loop's thread): one message for every connection served inline in
            # one wakeup, instead of one each.
            self.room_news = True

    def report(self, always: bool = False) -> None:
        """Tell the balancer what it has not heard yet (nothing is sent if nothing
        happened, unless `always`: our busy count is the news). Called after every loop
        iteration and before the worker exits."""
        sent = False
        while self.acked or self.closed:
            acked = _take_first(self.acked, REPORT_MAX_IDS)
            closed = _take_first(self.closed, REPORT_MAX_IDS - len(acked))
            # A lost report would leave the balancer holding copies of connections we
            # own (and re-sending them if we exit), or skew its counts.
            if not self._send_report(acked, closed):
                self.log.warning("the balancer is not reading; lost the news of %d taken and %d ended"
                                 " connections", len(acked), len(closed))
            sent = True
        while self.refused:
            refused = _take_first(self.refused, REFUSED_MAX)
            if not self._send_report((), (), refused):
                self.log.warning("the balancer is not reading; lost the news of %d refused connections",
                                 len(refused))
            sent = True
        if (always or self.room_news) and not sent:
            self._send_report((), ())

    def _send_report(self, acked, closed, refused=()) -> bool:
        # The claimed ones are not acknowledged yet: the balancer counts them itself.
        self.told_busy = self.server.busy_threads + len(self.claimed)
        self.room_news = False
        return self._send_patiently(Report(busy=self.server.busy_threads, acked=acked, closed=closed,
                                           refused=refused, threads=self.threads))

    def _park(self, conn_id: int, sock: socket.socket, peer, listener: str, left_s: float) -> None:
        """The server parks an idle connection we were given: back to the balancer,
        which passes its next request to a free worker (we go on serving)."""
        message = HandBack(peer=tuple(peer[:2]) if isinstance(peer, tuple) else ("", 0), listener=listener,
                           data=b"", keepalive_s=left_s)
        try:
            if not self._send_patiently(message, [sock.fileno()]):
                self.log.warning("could not park a connection; closing it")
                self.closed.append(conn_id)   # no hand-back said it ended here
        finally:
            sock.close()  # the balancer holds its own copy now (or the client sees a close)
        if conn_id in self.claimed:   # never acknowledged: the balancer's park handling drops its record
            self.claimed.discard(conn_id)
            self._maybe_free()

    def hand_back(self, sock: socket.socket, unparsed: bytes, peer, listener: str) -> None:
        """Give an idle keep-alive connection, and what we read of it, to the balancer."""
        message = HandBack(peer=tuple(peer[:2]) if isinstance(peer, tuple) else ("", 0), listener=listener,
                           data=unparsed)
        # Not `report()` first: the balancer must still hold its record of a connection
        # it gave us when the hand-back comes (the news that it ended here follows).
        try:
            if not self._send_patiently(message, [sock.fileno()]):
                self.log.warning("could not hand back a connection; closing it")
        except ValueError as exc:  # more unparsed bytes than a message holds
            self.log.warning("could not hand back a connection (%s); closing it", exc)
        finally:
            sock.close()  # the balancer holds its own copy now (or the client sees a close)

    def _send_patiently(self, message: Message, fds: list[int] = ()) -> bool:
        """Send; if the balancer is behind, wait a moment for room, once. False if it
        could not be sent (a balancer that is restarting starts its counts afresh)."""
        for _ in range(2):
            try:
                channel.send(self.sock, message, fds)
                return True
            except BlockingIOError:
                select.select([], [self.sock], [], SEND_WAIT_S)
            except OSError:
                return False
        return False


def _take_first(ids: list[int], count: int) -> list[int]:
    """Remove and return the first `count` of `ids`."""
    first = ids[:count]
    del ids[:count]
    return first
