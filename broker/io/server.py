"""The trio shell around the sans-IO bus: accept loop, connections, flushing."""

import logging
import os
import socket

import trio

from .. import build
from ..bus.lifecycle import ACTIVE
from ..bus.log_fields import LIMIT, about
from ..bus.peer import UserAccount
from ..bus.router import Bus
from ..bus.settings import BusSettings
from ..payload.closer import closer
from ..payload.vet import classifier
from .connection import Connection, drain_closing
from .creds import peer_creds
from .reactor import Reactor

log = logging.getLogger("sealbus.server")


class Server:
    def __init__(self, bus: Bus, busy_poll_us: int = 0):
        self.bus = bus
        self.connections: dict = {}
        self.dirty: set = set()
        self.wake = self.mark_dirty  # every Peer.wake: one bound method, not one per connection
        # connections not authenticated yet, per uid, oldest first (dicts keep insertion order)
        self.unauthenticated: dict[int, dict[Connection, None]] = {}
        self.incomplete = 0
        # connections holding fds of a message still in progress -> deadline (pending_fd_timeout);
        # the timeout is the same for all, so the first entry is due first
        self.fds_pending: dict[Connection, float] = {}
        self._fds_pending_added: trio.Event | None = None
        self.reactor = Reactor(self, busy_poll_us)
        # queued closes one uid may have: as many fds as it may have in flight (a uid over it is refused)
        closer.uid_share = bus.limits.max_inflight_fds_per_user
        bus.fd_quota.closing = closer  # fds waiting for a worker's close count against their sender's share
        classifier.prepare()  # its /proc fds, opened once now rather than at the first fd a client passes

    def apply_limits(self, values: dict) -> None:
        """New <limit> values from a reload, in force for every decision from now on, as dbus-daemon
        applies them (a connection's framer keeps the message bounds it was made with)."""
        from ..bus.limits import Limits
        from .composition import raise_fd_limit

        new = Limits()
        new.update(values)
        raise_fd_limit(new)  # the same cap on queued fds as at start-up
        self.bus.limits.update(vars(new))
        closer.uid_share = new.max_inflight_fds_per_user

    def mark_dirty(self, peer) -> None:
        self.dirty.add(peer)

    def flush_dirty(self) -> None:
        while self.dirty:
            peer = self.dirty.pop()
            conn = self.connections.get(peer)
            if conn is not None and not peer.state:  # ACTIVE
                conn.flush()
        if self.bus.closing:  # fds the core is done with (written, dropped or refused)
            drain_closing(self.bus)

    async def serve_listener(self, lsock: socket.socket, nursery) -> None:
        lsock.setblocking(False)
        self.reactor.watch_for_trio(lsock.fileno())
        while True:
            try:
                csock, _ = lsock.accept()
            except BlockingIOError:
                self.reactor.trio_done(lsock.fileno())
                await trio.lowlevel.wait_readable(lsock)
                continue
            except OSError as e:
                log.error("accept failed: %s", e)
                await trio.sleep(0.1)
                continue
            csock.setblocking(False)
            try:
                creds = peer_creds(csock)
            except OSError as e:
                log.warning("cannot read peer credentials: %s", e)
                csock.close()
                continue
            if closer.over_share(creds.uid) or self._closing_over_share(creds.uid):
                log.warning("refused connection uid=%d pid=%d label=%s: %d fds it sent still wait to be closed",
                            creds.uid, creds.pid, creds.label or "-", closer.charged.get(creds.uid, 0),
                            extra=about(LIMIT, creds, limit="fd_close_queue"))  # fmt: skip
                csock.close()
                continue
            self._make_room_for(creds.uid)
            conn = Connection(self, csock, creds)
            self.unauthenticated.setdefault(creds.uid, {})[conn] = None
            self.incomplete += 1  # until authenticated or gone (authentication_ended)
            # its SASL lines end the reactor's linger, from before its task first runs
            self.reactor.watch_for_trio(csock.fileno(), pending=True)
            nursery.start_soon(conn.run)

    def _closing_over_share(self, uid: int) -> bool:
        """Whether ``uid`` has more fds waiting for a close than its fd share allows it to hold."""
        quota = self.bus.fd_quota
        if not quota.closing_fds(uid):
            return False
        acct = self.bus.conns.accounts.get(uid)
        return quota.refuses(acct if acct is not None else UserAccount(uid), 0)

    def _make_room_for(self, uid: int) -> None:
        """Keep unauthenticated connections within their limits by evicting, never by refusing.

        The uid is known at accept (SO_PEERCRED). A uid at its share of
        max_incomplete_connections loses its own oldest one; at the global
        limit, the uid holding most loses its oldest. Sockets that never
        authenticate thus cost their owner its own slots and nobody else
        theirs (dbus-daemon refuses everyone once one user holds them all).
        Root may start many services at once at boot: only the global
        limit applies to it here (max_connections_per_user, a different
        limit, counts root too, as in dbus-daemon).
        """
        limit = self.bus.limits.max_incomplete_connections
        mine = self.unauthenticated.get(uid)
        if mine and len(mine) >= incomplete_share(limit) and uid != 0:  # root: only the global limit
            self._evict(next(iter(mine)), "its uid holds its share of incomplete connections")
        if self.incomplete >= limit and self.unauthenticated:
            most = max(self.unauthenticated.values(), key=len)  # at most max_incomplete_connections uids
            self._evict(next(iter(most)), "too many incomplete connections (max_incomplete_connections)")

    def _evict(self, conn: Connection, why: str) -> None:
        log.warning("dropped unauthenticated connection %s: %s", conn.describe(), why,
                    extra=about(LIMIT, conn.creds, limit="max_incomplete_connections"))  # fmt: skip
        self.authentication_ended(conn)
        conn.evict()

    def authentication_ended(self, conn: Connection) -> None:
        """``conn`` authenticated, failed, timed out or was evicted: it no longer counts as incomplete."""
        mine = self.unauthenticated.get(conn.creds.uid)
        if mine is not None and mine.pop(conn, False) is None:
            self.incomplete -= 1
            if not mine:
                del self.unauthenticated[conn.creds.uid]

    # -- fds of messages in progress (pending_fd_timeout) ----------------------

    def hold_fds(self, conn: Connection) -> None:
        """``conn`` holds fds of a message in progress: it must complete it within pending_fd_timeout."""
        if conn not in self.fds_pending:
            self.fds_pending[conn] = trio.current_time() + self.bus.limits.pending_fd_timeout / 1000
            if self._fds_pending_added is not None:
                self._fds_pending_added.set()

    def fds_claimed(self, conn: Connection) -> None:
        self.fds_pending.pop(conn, None)

    async def expire_pending_fds(self) -> None:
        """Disconnect clients that hold fds in a message they do not finish (dbus-daemon's pending_fd_timeout)."""
        pending = self.fds_pending
        while True:
            if not pending:
                self._fds_pending_added = trio.Event()
                await self._fds_pending_added.wait()
                self._fds_pending_added = None
                continue
            conn, deadline = next(iter(pending.items()))
            if trio.current_time() < deadline:
                await trio.sleep_until(deadline)
                continue
            del pending[conn]
            if conn.state is ACTIVE:
                self.bus.kill(conn.peer, "held fds of an unfinished message longer than pending_fd_timeout")
                self.reactor.finish_closing()


def incomplete_share(max_incomplete: int) -> int:
    """Unauthenticated connections one uid may hold: a quarter of max_incomplete_connections."""
    return max(1, max_incomplete // 4)


def take_over_listener(sock: socket.socket) -> None:
    """listen() again on an inherited listening socket, from the process that will serve it.

    Linux records the peer credentials a client sees (SO_PEERCRED: pid, uid,
    gid) at each listen() call on an AF_UNIX socket. The launcher or systemd
    called it first, so without this busctl and every client would report
    their pid for the bus instead of the broker's. Must run before the
    seccomp filter (listen is not in it); connections already queued keep
    the earlier credentials.
    """
    sock.listen(socket.SOMAXCONN)


async def serve(settings: BusSettings, listeners, *, control=None, fuse_fd=None, bus: Bus | None = None,
                task_status=trio.TASK_STATUS_IGNORED) -> None:  # fmt: skip
    """Run the bus on already-bound listening sockets until cancelled.

    ``control``: the control socket of the launcher, which reads the configuration for this bus (reloads
    are asked of it, and it starts activatable services); without one, the bus re-reads its own config
    file and watches its directories, and spawns services itself."""
    import gc

    from .gc_policy import for_serving

    # Routing allocates short-lived objects only; move everything that exists
    # now out of the collector's way and collect young objects less often.
    gc.freeze()
    for_serving()
    watcher = open_config_watcher(settings, control)  # before make_bus reads the service directories
    if bus is None:
        from .composition import make_bus

        bus = make_bus(settings)
    server = Server(bus, settings.busy_poll_us)
    bus.server = server
    async with trio.open_nursery() as nursery:
        bus.spawn = nursery.start_soon
        nursery.start_soon(server.reactor.run)
        nursery.start_soon(server.expire_pending_fds)
        from .timers import run_reply_timer

        nursery.start_soon(run_reply_timer, bus, server)  # reply_timeout (idle while nothing is timed)
        from .activation import default_starter, run_activation

        bus.activator.via_launcher = control is not None  # it starts services: no environment updates
        address = next((lst.address for lst in listeners if getattr(lst, "address", None)), "")
        bus.activator.address = f"{address},guid={bus.guid}" if address else ""
        nursery.start_soon(run_activation, bus, server, default_starter(nursery, control))
        start_reloader(bus, settings, nursery, control, watcher)
        from ..payload.bus_glue import note_listening_sockets

        socks = [getattr(lst, "sock", lst) for lst in listeners]
        note_listening_sockets(bus, socks)
        for sock in socks:
            nursery.start_soon(server.serve_listener, sock, nursery)
        if settings.payload_fs or fuse_fd is not None:
            from .fuse import start_payload_fs

            await start_payload_fs(bus, settings, nursery, fuse_fd=fuse_fd)
        if control is not None:
            from .composition import apply_control
            from .control import control_loop

            nursery.start_soon(control_loop, control, lambda msg: apply_control(bus, msg))
        task_status.started(bus)
        log.info("bus ready (pid %d, guid %s, hot path: %s)", os.getpid(), bus.guid, build())


def open_config_watcher(settings: BusSettings, launcher):
    """inotify on the config's directories, for a bus that reads its own config (else None)."""
    cfg = settings.config
    if launcher is not None or cfg is None:
        return None
    from .reload import open_watcher, watch_paths

    return open_watcher(watch_paths(cfg))


def start_reloader(bus: Bus, settings: BusSettings, nursery, launcher, watcher) -> None:
    """ReloadConfig, SIGHUP (``bus.reloader.request``) and inotify: see broker.io.reload."""
    from .reload import Reloader

    cfg = settings.config
    path = cfg.files[0] if cfg is not None and cfg.files else None
    reloader = Reloader(bus, path, settings.bus_type, launcher=launcher)
    bus.reloader = reloader
    bus.reload_hook = reloader.driver_hook
    nursery.start_soon(reloader.run)
    if watcher is not None:
        nursery.start_soon(reloader.watch, watcher)
