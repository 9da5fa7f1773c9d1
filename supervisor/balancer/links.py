"""The balancer's worker links: one SOCK_SEQPACKET channel end per worker, on the loop.

Out goes a CONN per connection (the fd, its id, peer, listener, unparsed bytes); in
come the worker's REPORTs (connections it now owns, connections that ended or never
reached it, busy threads and how many it has) and HANDBACKs (an idle keep-alive
connection from a retiring worker, or one a serving worker parks). Every decision is
the dispatch core's: a link only moves messages and fds between the channel and
`Dispatcher` (and parked connections to `Intake.park`), and tells it when the channel
closed.

A worker runs app code, which can write anything on its channel; so a link believes
a worker only about the connections the balancer gave it. Promises:

* The balancer's copy of a connection is closed when the worker's REPORT acknowledges
  it, never before; one it refused (its fd never reached it) goes to another worker or
  gets a 503. A worker acknowledges a connection once its first request starts, in the
  REPORT it sends at the end of its loop iteration, not one per connection, so it may
  have read, even served, a connection it has not acknowledged yet. So when a worker exits (its pidfd, from the master's
  RECLAIM, says so), what it never read is read back from a copy of its own channel
  end (the CONNs still queued there): those connections go to another worker, and so
  does each one it read but never touched (`untouched`: the kernel's counters say no
  byte was read from or written to it since we passed it on); the others it took, and
  went with it. A link without RECLAIM (a moment after its
  ATTACH) falls back to the channel's end, and passes on every unacknowledged one.
* **A worker hands back only what it was given, to its own app.** Each connection sent
  is recorded (its socket's (st_dev, st_ino), the same file on both sides of
  SCM_RIGHTS, with its peer, listener and PROXY origin) until the worker reports it
  closed or hands it back. A HANDBACK whose fd is one of that worker's records gets the
  record's peer and listener and the link's app; only its unparsed bytes are the
  worker's word. The cost per connection is a dict entry, and an fstat of our copy
  only if it can still come back: when a REPORT acknowledges it without also saying it
  closed (a connection per request, acknowledged and closed in one REPORT, needs none),
  or when the worker first hands one back while we still hold it.
* A connection the worker accepted itself (on a `share` or `reuseport` listener, which
  the balancer never sees) has no record. It is taken only as a connected stream
  socket that names no `balance` listener (those connections it would have been
  given), and goes to the worker's own app only, with the kernel's peer address (on a
  PROXY listener, where the kernel's is the proxy's, the worker's word: it reaches
  only its own app). So no worker can reach another app, or forge a client address
  for one.
* **A worker that lies loses its link**: an fd that is not a connection, or that it
  was not given on a `balance` listener (closed at once), a HANDBACK naming an app, a
  message that does not decode, a kind only the master takes. The link is shut down
  (the worker sees its channel end and stops, so the master replaces it) and its
  unacknowledged connections go elsewhere; the balancer carries on. Ids in a REPORT
  that name no connection of that worker count for nothing.
* A worker that hands a connection back retires: it gets no more connections. Except
  a **parked** one (HANDBACK with `keepalive_s`): the worker goes on serving, and the
  connection, idle, waits in the intake for its next request's bytes (see intake.py),
  then goes to a free worker like a new one. Only a connection the balancer gave that
  worker may be parked (its record says whose it is); one it did not give is taken as
  a retiring worker's hand-back. Parked bytes (`data`, the worker's word) keep it on
  its own app.
* Only the old master's balancer (a negative key, after an upgrade) names the app of
  what it hands over; after a master upgrade (`upstream` set) handed-back and parked
  connections (those parked already, too) go to the new master's balancer, naming
  their app; if that fails they are dispatched here.
* At most READS_PER_WAKEUP messages are read from one link per wakeup, so a chatty
  worker cannot starve the others (the level-triggered loop comes back for the rest).
"""
from __future__ import annotations

import os
import socket
from collections.abc import Callable

from supervisor.balancer import untouched
from supervisor.balancer.dispatch import Decision, Dispatcher, Send, Worker
from supervisor.balancer.intake import Intake, Pending
from supervisor.ipc import channel
from supervisor.ipc.channel import ChannelClosed, Truncated
from supervisor.ipc.messages import Conn, HandBack, MessageError, Report, encode_conn
from supervisor.system.loop import Loop
from supervisor.system.words import count as counted

READS_PER_WAKEUP = 64


class WorkerLink:
    """One worker's channel end (`key`: its pid; negative for the old master's
    balancer after an upgrade, which only hands connections over), its core record,
    and the connections sent to it that it still holds (`owned`: conn id -> Pending,
    indexed by socket identity in `by_ident` once it first hands one back)."""

    __slots__ = ("key", "app", "sock", "worker", "owned", "by_ident", "worker_end", "pidfd")

    def __init__(self, key: int, app: str, sock: socket.socket, worker: Worker) -> None:
        self.key = key
        self.app = app
        self.sock = sock
        self.worker = worker
        self.owned: dict[int, Pending] = {}
        self.by_ident: dict[tuple[int, int], int] | None = None
        self.worker_end: socket.socket | None = None   # a copy of the worker's end (RECLAIM)
        self.pidfd = -1                                # the worker's, readable once it exited


class Links:
    """Every worker link of the balancer. `perform` carries out a core decision (the
    balancer's; it calls `send_conn` for a Send)."""

    def __init__(self, loop: Loop, core: Dispatcher, perform: Callable[[Decision | None], None], log,
                 intake: Intake | None = None) -> None:
        self.loop = loop
        self.core = core
        self.perform = perform
        self.log = log
        self.intake = intake   # which listeners are `balance` ones, and which expect PROXY headers
        self.by_key: dict[int, WorkerLink] = {}
        self.upstream: socket.socket | None = None   # a new master's balancer, after an upgrade
        # Counters, for /metrics.
        self.handed_back = 0
        self.handbacks: dict[str, int] = {}   # per app
        self.parks: dict[str, int] = {}       # per app

    def attach(self, key: int, app: str, sock: socket.socket) -> None:
        """A new link; KeyError (nothing changed) if `key` has one already."""
        worker = self.core.attach(key, app)
        sock.setblocking(False)
        link = self.by_key[key] = WorkerLink(key, app, sock, worker)
        self.loop.register(sock, lambda: self._readable(link))

    def reclaim(self, key: int, worker_end: socket.socket, pidfd: int) -> None:
        """The worker's own channel end (a copy) and its pidfd: from now on its exit, not
        the channel's end, is when its unread connections are read back (see the
        module's promises). Both are closed if the link has them already, or is gone."""
        link = self.by_key.get(key)
        if link is None or link.worker_end is not None:
            worker_end.close()
            os.close(pidfd)
            return
        worker_end.setblocking(False)
        link.worker_end, link.pidfd = worker_end, pidfd
        self.loop.register(pidfd, lambda: self._exited(link))

    def _exited(self, link: WorkerLink) -> None:
        """The worker exited: first what it sent before (its last REPORT, hand-backs),
        then what it never read."""
        if self.by_key.get(link.key) is not link:
            return
        self._readable(link, limit=None)
        self._gone(link)

    def detach(self, key: int) -> None:
        """The worker retires: send it no more connections (it still reports)."""
        link = self.by_key.get(key)
        if link is not None:
            self.core.detach(link.worker)

    def gone(self, key: int) -> None:
        """The master says the worker is gone (an attached one that went silent): what
        it never read goes elsewhere, now."""
        link = self.by_key.get(key)
        if link is not None:
            self._gone(link)

    def set_upstream(self, sock: socket.socket) -> None:
        if self.upstream is not None:
            self.upstream.close()
        sock.setblocking(True)   # a hand-back is rare, and must not be lost to EAGAIN
        self.upstream = sock
        if self.intake is not None:   # what waits parked here goes to the new master's balancer too
            for pending in self.intake.unpark_all():
                self._pass_on(pending.detach(), pending.peer, pending.listener, pending.data, pending.app,
                              pending.client, as_handback=False)

    def pass_upstream(self, pendings: list[Pending]) -> None:
        """Give queued connections to the new master's balancer (after an upgrade our
        workers only drain), as hand-backs; one it cannot take is dispatched here again.
        (Not one whose PROXY header no worker has read yet: a hand-back's stream has
        none; see `movable`.)"""
        for pending in pendings:
            self._pass_on(pending.detach(), _presented_peer(pending), pending.listener, pending.data,
                          pending.app, pending.client)

    @staticmethod
    def movable(pending: Pending) -> bool:
        """Whether `pass_upstream` may take it."""
        return not pending.proxy

    def send_conn(self, send: Send) -> bool:
        """Pass the connection to the worker; False if its channel is full or broken."""
        pending = send.conn
        peer = pending.peer
        if type(peer) is not tuple:   # a UNIX socket's peer: a path, or nothing
            peer = (str(peer or ""), 0)
        message = encode_conn(send.conn_id, peer, pending.listener, pending.data, pending.proxy)
        fd = pending.fd
        link = self.by_key[send.worker.key]
        try:
            channel.send_encoded(link.sock, message, [fd])
        except OSError:
            return False
        link.owned[send.conn_id] = pending
        if link.by_ident is not None:
            pending.ident = ident = _ident(fd)
            link.by_ident[ident] = send.conn_id
        else:
            pending.ident = None   # taken from our copy only if it may still come back
        return True

    def take_back(self, worker: Worker) -> tuple[bool, Decision | None]:
        """The oldest connection still unread in the worker's channel, taken back from
        our copy of its end (see the dispatch core's promise 2c), and what becomes of it;
        (False, None) when it read them all, or we hold no copy of its end. The fd that
        came with it is closed: ours is the one that goes on."""
        link = self.by_key.get(worker.key)
        if link is None or link.worker_end is None:
            return False, None
        try:
            message, fds = channel.receive(link.worker_end)
        except Truncated as exc:   # we are out of fds: our copy still serves
            message, fds = exc.message, []
        except (BlockingIOError, ChannelClosed, MessageError, OSError):
            return False, None
        for fd in fds:
            os.close(fd)
        if type(message) is not Conn:   # only CONNs travel this way: nothing to take
            return False, None
        pending = link.owned.pop(message.id, None)
        if pending is None:
            return False, None
        if link.by_ident is not None and pending.ident is not None:
            link.by_ident.pop(pending.ident, None)
        return self.core.stolen(worker, message.id)

    def _readable(self, link: WorkerLink, limit: int | None = READS_PER_WAKEUP) -> None:
        """Read the worker's messages, `limit` of them at most (None: all there are)."""
        sock, worker, core = link.sock, link.worker, self.core
        for _ in range(limit) if limit is not None else iter(int, 1):
            try:
                message, fds = channel.receive(sock)
            except BlockingIOError:
                return
            except (ChannelClosed, ConnectionError):
                self._gone(link)
                return
            except Truncated as exc:   # we are out of fds: our shortage, not the worker's lie
                self.log.warning("worker %d: %s; the connection it carried is lost", link.key, exc)
                continue
            except MessageError as exc:
                if link.key < 0:   # the old master's balancer: ours, never lying
                    self.log.warning("the old master's balancer sent a bad message: %s", exc)
                    continue
                self._drop(link, f"sent a bad message: {exc}")
                return
            kind = type(message)
            if kind is Report:
                owned = link.owned
                closed = message.closed
                if closed:   # only what it was given counts (and stops being handed back)
                    closed = [conn_id for conn_id in closed if owned.pop(conn_id, None) is not None]
                for conn_id in message.acked:   # our copy goes: note who it is while we can
                    pending = owned.get(conn_id)
                    if pending is not None and pending.ident is None and pending.fd >= 0:
                        pending.ident = _ident(pending.fd)
                for conn in core.report(worker, message.acked, closed, message.busy, message.threads):
                    conn.close()   # the worker owns it now
                if message.refused:
                    self._refused(link, message.refused)
            elif kind is HandBack:   # with its one fd
                if not self._handed_back(link, message, fds[0]):
                    return
            else:
                for fd in fds:
                    os.close(fd)
                if link.key < 0:
                    self.log.warning("the old master's balancer sent a %s message", message.KIND)
                    continue
                self._drop(link, f"sent a {message.KIND} message, which only the master takes")
                return

    def _refused(self, link: WorkerLink, conn_ids: tuple[int, ...]) -> None:
        """Connections whose fd never reached the worker: they go elsewhere."""
        unacked = link.worker.unacked
        refused = [conn_id for conn_id in conn_ids if conn_id in unacked]
        for conn_id in refused:
            link.owned.pop(conn_id, None)
        if refused:
            self.log.warning("worker %d could not take %s (out of fds); passing them on",
                             link.key, counted(len(refused), "connection"))
        for decision in self.core.refused(link.worker, refused):
            self.perform(decision)

    def _handed_back(self, link: WorkerLink, message: HandBack, fd: int) -> bool:
        """Pass a handed-back connection on; False if that cost the worker its link."""
        if link.key < 0:   # the old master's balancer: what it says is ours to believe
            self._pass_on(fd, message.peer, message.listener, message.data, message.app or link.app,
                          message.peer[0])
            return True
        ident = _ident(fd)
        if link.by_ident is None:   # once per worker: its first hand-back
            for pending in link.owned.values():
                if pending.ident is None and pending.fd >= 0:   # still ours, unacknowledged
                    pending.ident = _ident(pending.fd)
            link.by_ident = {pending.ident: conn_id for conn_id, pending in link.owned.items()
                             if pending.ident is not None}
        conn_id = link.by_ident.pop(ident, None)
        recorded = link.owned.pop(conn_id, None) if conn_id is not None else None
        if recorded is None or recorded.ident != ident:
            return self._handed_back_unrecorded(link, message, fd)
        worker = link.worker
        if message.keepalive_s is not None and not message.app:
            self._park(link, conn_id, recorded, message, fd)
            return True
        self.core.detach(worker)   # only a retiring worker hands connections back
        # It ended at this worker (its REPORT's word for it, which follows, counts for
        # nothing now); if it was never acknowledged, our copy goes.
        for conn in self.core.report(worker, (conn_id,), (conn_id,), worker.busy):
            conn.close()
        self._pass_on(fd, _presented_peer(recorded), recorded.listener, message.data, link.app, recorded.client)
        if message.app:
            self._drop(link, f"handed back a connection naming app {message.app!r}")
            return False
        return True

    def _park(self, link: WorkerLink, conn_id: int, recorded: Pending, message: HandBack, fd: int) -> None:
        """A serving worker parks a connection it was given: it ended there, and waits
        here for its next request (or goes on at once, with bytes the worker read)."""
        worker = link.worker
        for conn in self.core.report(worker, (conn_id,), (conn_id,), worker.busy):
            conn.close()   # never acknowledged: our copy goes
        self.parks[link.app] = self.parks.get(link.app, 0) + 1
        if self.upstream is not None or self.intake is None or message.data:
            self._pass_on(fd, _presented_peer(recorded), recorded.listener, message.data, link.app,
                          recorded.client, as_handback=False)
            return
        sock = socket.socket(fileno=fd)
        self.intake.park(Pending(sock, _presented_peer(recorded), recorded.listener, link.app, recorded.client,
                                 passed=untouched.counts(sock)), message.keepalive_s)

    def _handed_back_unrecorded(self, link: WorkerLink, message: HandBack, fd: int) -> bool:
        """A connection we did not give: see the module's promises."""
        intake = self.intake
        balanced = intake.routes if intake is not None else ()
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            os.close(fd)
            self._drop(link, f"handed back something that is not a connection: {exc}")
            return False
        try:
            if message.listener in balanced:
                raise OSError(f"a connection of listener {message.listener!r}, which it was never given")
            if sock.type != socket.SOCK_STREAM or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                raise OSError("not a connected stream socket")
            peer = sock.getpeername()
        except OSError as exc:
            sock.close()
            self._drop(link, f"handed back something that is not a connection it may hand back ({exc});"
                             " closed it")
            return False
        if intake is not None and message.listener in intake.proxy_listeners:
            peer = message.peer
        elif type(peer) is tuple:
            peer = (peer[0], peer[1])
        else:
            peer = (str(peer or ""), 0)   # a UNIX socket's peer
        self.core.detach(link.worker)   # only a retiring worker hands connections back
        self._pass_on(sock.detach(), peer, message.listener, message.data, link.app, peer[0] or None)
        if message.app:
            self._drop(link, f"handed back a connection naming app {message.app!r}")
            return False
        return True

    def _pass_on(self, fd: int, peer: tuple[str, int], listener: str, data: bytes, app: str,
                 client: str | None, as_handback: bool = True) -> None:
        """Dispatch (or send upstream) a connection handed back; `as_handback`: count it
        as one (False: a park, counted as such by the caller)."""
        if as_handback:
            self.handed_back += 1
            self.handbacks[app] = self.handbacks.get(app, 0) + 1
        if self.upstream is not None:
            try:
                channel.send(self.upstream, HandBack(peer, listener, data, app), [fd])
                os.close(fd)
                return
            except (OSError, ValueError) as exc:  # ValueError: with `app`, too big for one message
                self.log.warning("could not pass a connection to the new master: %s", exc)
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:  # the fd the old master's balancer sent is not a socket
            os.close(fd)
            self.log.warning("handed back something that is not a connection: %s", exc)
            return
        self.perform(self.core.dispatch(Pending(sock, peer, listener, app, client, data=data,
                                                passed=untouched.counts(sock))))

    def _drop(self, link: WorkerLink, why: str) -> None:
        """The worker lied: use it no more. The master holds a copy of this channel end
        (for a restarted balancer), so closing ours alone would tell the worker nothing:
        shutting the channel down (`_gone`) is what it hears."""
        self.log.error("worker %d %s; dropping its link", link.key, why)
        self._gone(link)

    def _gone(self, link: WorkerLink) -> None:
        """The worker exited, or the channel ended (or we end it: a zero-length record
        reads as its end, and only app code sends one). Shut down, so a worker still
        there hears it too; what it never read goes elsewhere."""
        if self.by_key.get(link.key) is not link:
            return   # its exit and its channel's end, in one wakeup
        del self.by_key[link.key]
        unread = None
        if link.worker_end is not None:   # before the shutdown below
            unread = _read_back(link.worker_end)
            # Read but never touched (sent ahead, or taken just before it died): the
            # request is whole in the socket, and nothing was answered.
            unread.update(conn_id for conn_id, conn in link.worker.unacked.items()
                          if conn_id not in unread and untouched.untouched(conn.sock, conn.passed))
            link.worker_end.close()
            self.loop.unregister(link.pidfd)
            os.close(link.pidfd)
        self.loop.unregister(link.sock)
        try:
            link.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        link.sock.close()
        decisions, lost = self.core.gone(link.worker, unread)
        for conn in lost:
            conn.close()   # the worker took it, and it went with the worker
        for decision in decisions:
            self.perform(decision)

    def close(self) -> None:
        """Close every link (the balancer is exiting); the master keeps its copies."""
        for link in self.by_key.values():
            self.loop.unregister(link.sock)
            link.sock.close()
            if link.worker_end is not None:
                link.worker_end.close()
                self.loop.unregister(link.pidfd)
                os.close(link.pidfd)
        self.by_key.clear()
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None


def _ident(fd: int) -> tuple[int, int]:
    """The socket's (st_dev, st_ino): the same file on both sides of SCM_RIGHTS."""
    stat = os.fstat(fd)
    return (stat.st_dev, stat.st_ino)


def _read_back(worker_end: socket.socket) -> set[int]:
    """The ids of the CONNs still queued at a worker's end: those it never read. Their
    fds are closed (we hold a copy of each until acknowledged)."""
    unread: set[int] = set()
    while True:
        try:
            message, fds = channel.receive(worker_end)
        except Truncated as exc:   # we are out of fds: our copy still serves
            if type(exc.message) is Conn:
                unread.add(exc.message.id)
            continue
        except MessageError:
            continue
        except (BlockingIOError, ChannelClosed, OSError):
            return unread
        for fd in fds:
            os.close(fd)
        if type(message) is Conn:
            unread.add(message.id)


def _presented_peer(pending: Pending) -> tuple[str, int]:
    """The client address a connection's next worker is told: the PROXY header's, once
    the first worker consumed that header; (host, port) even for IPv6."""
    peer = pending.origin if pending.proxy else pending.peer
    if type(peer) is tuple:
        return (peer[0], peer[1])
    return (str(peer or ""), 0)   # a UNIX socket's peer, or no address at all
