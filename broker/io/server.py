"""The trio shell around the sans-IO bus: accept loop, connections, flushing."""

import logging
import os
import socket

import trio

from ..bus.router import Bus
from ..bus.settings import BusSettings
from .connection import Connection
from .creds import peer_creds
from .reactor import Reactor

log = logging.getLogger("sealbus.server")


class Server:
    def __init__(self, bus: Bus, busy_poll_us: int = 0):
        self.bus = bus
        self.connections: dict = {}
        self.dirty: set = set()
        self.incomplete = 0
        self.reactor = Reactor(self, busy_poll_us)

    def mark_dirty(self, peer) -> None:
        self.dirty.add(peer)

    def flush_dirty(self) -> None:
        while self.dirty:
            peer = self.dirty.pop()
            conn = self.connections.get(peer)
            if conn is not None and not conn.dying:
                conn.flush()

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
            if self.incomplete >= self.bus.limits.max_incomplete_connections:
                log.warning("refused connection uid=%d pid=%d: too many incomplete connections",
                            creds.uid, creds.pid)  # fmt: skip
                csock.close()
                continue
            self.incomplete += 1  # until authenticated (Connection.run decrements)
            # its SASL lines end the reactor's linger, from before its task first runs
            self.reactor.watch_for_trio(csock.fileno(), pending=True)
            nursery.start_soon(self._run_connection, csock, creds)

    async def _run_connection(self, csock, creds) -> None:
        conn = Connection(self, csock, creds)
        try:
            await conn.run()
        finally:
            if not conn.completed:
                self.incomplete -= 1


def read_machine_id() -> str:
    for p in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(p) as f:
                v = f.read().strip()
            if len(v) == 32:
                return v
        except OSError:
            continue
    return ""


def raise_fd_limit(limits) -> int:
    """Raise RLIMIT_NOFILE to its hard limit and keep fd quotas below it.

    Running out of fds would stop the bus from accepting anyone: no single
    user may pin more than a quarter of them in queues, and a client can
    never make the broker exceed the limit by itself.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    budget = max(64, soft // 4)
    limits.max_inflight_fds_per_user = min(limits.max_inflight_fds_per_user, budget)
    limits.max_outgoing_unix_fds = min(limits.max_outgoing_unix_fds, budget)
    return soft


def make_bus(settings: BusSettings) -> Bus:
    raise_fd_limit(settings.limits)
    bus = Bus(settings.limits, machine_id=settings.machine_id or read_machine_id())
    bus.policy = settings.policy
    if settings.selinux is not None:
        from ..access.mediator import BusPolicy

        xml = settings.policy.policy if settings.policy is not None else None
        bus.policy = BusPolicy(xml, settings.selinux)
        log.info("SELinux mediation on (bus label %s)", settings.selinux.bus_label)
    from ..payload.bus_glue import install_fd_vetting

    install_fd_vetting(bus, settings)
    return bus


async def serve(settings: BusSettings, listeners, *, control=None, fuse_fd=None, bus: Bus | None = None,
                task_status=trio.TASK_STATUS_IGNORED) -> None:  # fmt: skip
    """Run the bus on already-bound listening sockets until cancelled."""
    import gc

    # Routing allocates short-lived objects only; move everything that exists
    # now out of the collector's way and collect young objects less often.
    gc.freeze()
    gc.set_threshold(50000, 20, 100)
    bus = bus or make_bus(settings)
    server = Server(bus, settings.busy_poll_us)
    bus.server = server
    async with trio.open_nursery() as nursery:
        bus.spawn = nursery.start_soon
        nursery.start_soon(server.reactor.run)
        from .timers import run_reply_timer

        nursery.start_soon(run_reply_timer, bus, server)  # reply_timeout (idle while nothing is timed)
        from ..payload.bus_glue import note_listening_sockets

        socks = [getattr(lst, "sock", lst) for lst in listeners]
        note_listening_sockets(bus, socks)
        for sock in socks:
            nursery.start_soon(server.serve_listener, sock, nursery)
        if settings.payload_fs or fuse_fd is not None:
            from ..payload.bus_glue import start_payload_fs

            await start_payload_fs(bus, settings, nursery, fuse_fd=fuse_fd)
        if control is not None:
            from ..launch.control import control_loop

            nursery.start_soon(control_loop, control, lambda msg: apply_control(bus, msg))
        task_status.started(bus)
        log.info("bus ready (pid %d, guid %s)", os.getpid(), bus.guid)


def apply_control(bus: Bus, msg: dict) -> None:
    """A message from the launcher: currently only a policy reload."""
    if msg.get("type") == "reload" and "policy" in msg:
        from ..access.mediator import BusPolicy
        from ..access.policy import Policy

        xml = Policy.from_json(msg["policy"]) if msg["policy"] else None
        if bus.policy is not None and bus.policy.selinux is not None:
            bus.policy = bus.policy.with_xml(xml)
        else:
            bus.policy = BusPolicy(xml) if xml is not None else None
        log.info("policy reloaded by the launcher")
