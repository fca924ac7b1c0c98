"""One epoll for all authenticated connections, driven by a single trio task.

Why: with a trio task per connection, every readable socket costs a task
wake-up and an epoll re-registration. Here trio waits on one epoll fd; when
it fires, every ready connection is served in the same pass (read, route,
flush), which batches work across peers as well as within one peer. Other
trio tasks (accepting, authentication, the FUSE server, timers) still run:
the reactor yields after every few passes.

Lingering: after a pass the reactor waits in its own epoll for a short while (LINGER) before handing the wait
back to trio. A request/reply exchange then costs one epoll_wait per hop
instead of trio's re-arm, wait and task switch; the linger itself sleeps
in the kernel. Trio gets the loop back at least every YIELD_EVERY
seconds, so accepts, the FUSE server, the launcher channel and timers are
late by at most that much under load.

Lingering must not keep trio's own work waiting: the reactor does not
linger while another trio task is runnable or has input it has not read
yet (it waits in trio instead), and listening
sockets and the sockets of connections still authenticating (trio tasks)
are in the reactor's epoll too, edge-triggered, so a new connection or a
SASL line ends a linger at once; a connection that sits idle before
authenticating costs the others nothing.

Validation in steps: a connection whose message has a large body (see
:mod:`broker.wire.body_check`) is in ``validating``; it is not read, and each
pass takes one bounded step of its validation after serving the ready
connections, so a dense body that costs seconds to check never holds the
loop for more than a step. While any connection is validating, the reactor
neither waits nor lingers.

Busy polling: before the linger's sleep, the reactor may poll for up to a
window that adapts to the traffic (see :mod:`busy_poll`): zero on a quiet
bus, up to ``busy_poll_us`` when messages follow each other closely.
"""

import logging
import os
import select
import time

import trio

from ..bus.lifecycle import CLOSING
from .busy_poll import PollWindow

current_statistics = trio.lowlevel.current_statistics

log = logging.getLogger("sealbus.io")

EPOLLIN, EPOLLOUT, EPOLLET = select.EPOLLIN, select.EPOLLOUT, select.EPOLLET
EPOLL_CLOSE = select.EPOLLHUP | select.EPOLLERR | select.EPOLLRDHUP
READ_EVENTS = EPOLLIN | EPOLL_CLOSE
PASSES_BEFORE_YIELD = 4
CATCH_UP_PASSES = 4  # most passes a new connection waits for hang-ups already reported (Reactor.catch_up)
LINGER = 0.0005  # seconds the reactor keeps waiting in its own epoll after a pass
YIELD_EVERY = 0.002  # most time the reactor keeps the loop before trio runs its other tasks


class Reactor:
    def __init__(self, server, busy_poll_us: int = 0):
        self.server = server
        self.poll = PollWindow(busy_poll_us / 1e6)
        self.ep = select.epoll()
        self.conns: dict[int, object] = {}
        self.writing: set[int] = set()
        self.closing: list = []
        # connections that read since the last sweep, and in the sweep before
        self.touched: set = set()
        self.touched_before: set = set()
        self.trio_fds: set[int] = set()  # fds trio tasks serve (listeners, connections authenticating)
        self.trio_pending: set[int] = set()  # of those, the ones with input their task has not taken yet
        self.validating: set = set()  # connections with a large message being validated in steps

    def add(self, conn) -> None:
        """Serve ``conn`` from now on. What the other connections have ready is served first (a
        hang-up the kernel reported before this connection completed is processed before any of
        its messages: a client that exits and a new one taking over its name at once)."""
        self.catch_up()
        fd = conn.sock.fileno()
        self.conns[fd] = conn
        self.ep.register(fd, EPOLLIN)

    def catch_up(self) -> None:
        """One pass over what is ready now, from outside :meth:`run` (which, whenever it is
        suspended, has served every event it polled)."""
        for _ in range(CATCH_UP_PASSES):
            events = self.ep.poll(0, 512)
            if not events:
                return
            self.serve(events)
            self.server.flush_dirty()
            self.finish_closing()
            if not any(ev & EPOLL_CLOSE for _fd, ev in events):
                return  # again only while a hang-up is still being read up to its end

    def serve(self, events) -> None:
        """Serve ``events`` in the order the kernel reported them. A connection that closed (or
        was disconnected) while being served is gone before the next one is: its names are
        released before a later connection's messages are routed."""
        conns = self.conns
        for fd, ev in events:
            conn = conns.get(fd)
            if conn is None or conn.peer.state:  # not ACTIVE: closed after this pass
                if fd in self.trio_fds:
                    self.trio_pending.add(fd)
                continue
            try:
                if ev & EPOLLOUT:
                    conn.on_writable()
                if ev & READ_EVENTS and not conn.peer.state:
                    conn.on_readable()
            except Exception:
                # A bug must cost one connection, never the bus.
                log.exception("internal error serving %s; disconnecting it", conn.describe())
                self._internal_error(conn)
            if self.closing:
                self.finish_closing()

    def watch_for_trio(self, fd: int, pending: bool = False) -> None:
        """Input on ``fd`` (served by a trio task) hands the loop back to trio without delay,
        and the reactor neither polls nor lingers until the task took it (:meth:`trio_done`)."""
        self.trio_fds.add(fd)
        if pending:
            self.trio_pending.add(fd)
        self.ep.register(fd, EPOLLIN | EPOLLET)

    def trio_done(self, fd: int) -> None:
        """The task serving ``fd`` read it empty (EAGAIN)."""
        self.trio_pending.discard(fd)

    def unwatch(self, fd: int) -> None:
        """``fd`` is no longer trio's (authenticated, or about to be closed)."""
        self.trio_pending.discard(fd)
        if fd in self.trio_fds:
            self.trio_fds.discard(fd)
            try:
                self.ep.unregister(fd)
            except (OSError, ValueError):
                pass

    def want_write(self, conn) -> None:
        fd = conn.fd
        if fd not in self.writing and fd in self.conns:
            self.writing.add(fd)
            self.ep.modify(fd, EPOLLIN | EPOLLOUT)

    def write_done(self, conn) -> None:
        fd = conn.fd
        if fd in self.writing:
            self.writing.discard(fd)
            self.ep.modify(fd, EPOLLIN)

    def remove(self, conn) -> None:
        fd = conn.fd
        self.validating.discard(conn)
        if self.conns.pop(fd, None) is not None:
            self.writing.discard(fd)
            self.touched.discard(conn)  # gone: nothing of it for the sweep
            self.touched_before.discard(conn)
            try:
                self.ep.unregister(fd)
            except (OSError, ValueError):
                pass

    def schedule_close(self, conn) -> None:
        self.closing.append(conn)

    def finish_closing(self) -> None:
        while self.closing:
            conn = self.closing.pop()
            try:
                peer = conn.peer
                if peer is not None and peer.outbox and conn.sock is not None:
                    conn.flush()  # a farewell the bus left queued (kill() drops everything else): one try
                conn.close()
            except Exception:
                log.exception("internal error closing %s", conn.describe())

    def sweep(self, quiet: bool) -> None:
        """Give back the receive buffers (and empty outboxes) of connections that stopped reading.

        A connection keeps its buffer while it reads (no pool round trip per
        read); one that did not read since the previous sweep, or every one
        when the bus is quiet, returns it, so an idle connection holds none.
        """
        idle = self.touched | self.touched_before if quiet else self.touched_before - self.touched
        for conn in idle:
            if conn.framer is not None:  # a closed connection left these sets (remove)
                conn.framer.release_idle_buffer()
                conn.peer.release_idle()
        self.touched_before = set() if quiet else self.touched
        self.touched = set()

    async def run(self) -> None:
        ep = self.ep
        conns = self.conns
        passes = 0
        clock = time.monotonic
        try:
            while True:
                # Trio tells us when the epoll fd is readable; then one
                # non-blocking poll hands us every ready connection at once.
                if self.validating:
                    await trio.lowlevel.checkpoint()  # validation steps are due: trio runs what is ready first
                else:
                    await trio.lowlevel.wait_readable(ep.fileno())
                give_back = clock() + YIELD_EVERY
                events = ep.poll(0, 512)
                while events or self.validating:
                    self.serve(events)
                    if self.validating:
                        self.validate_steps()
                    self.server.flush_dirty()
                    if self.closing:
                        self.finish_closing()
                    passes += 1
                    if self.trio_pending:
                        break  # a trio task has input (an accept, a SASL line): wait in trio, so it runs first
                    if passes >= PASSES_BEFORE_YIELD and clock() >= give_back:
                        passes = 0
                        self.sweep(quiet=False)
                        await trio.lowlevel.checkpoint()  # trio polls its own fds and runs what is ready
                        give_back = clock() + YIELD_EVERY
                    if clock() < give_back and not self.validating:
                        events = self._next_events(ep, clock)
                    else:
                        events = ep.poll(0, 512)
                self.finish_closing()
                self.sweep(quiet=not events)
        finally:
            for conn in list(conns.values()):
                conn.close()
            ep.close()

    def validate_steps(self) -> None:
        """One validation step of every connection in ``validating``."""
        for conn in list(self.validating):
            if conn.peer.state:  # not ACTIVE
                self.validating.discard(conn)
                continue
            try:
                conn.validate_step()
            except Exception:
                log.exception("internal error serving %s; disconnecting it", conn.describe())
                self.validating.discard(conn)
                self._internal_error(conn)

    def _internal_error(self, conn) -> None:
        """A bug must cost one connection, never the bus: it is closed after this pass."""
        if not conn.peer.state:  # no outbox walk here: disconnect drops it
            conn.peer.to(CLOSING, "internal error")
        self.closing.append(conn)

    def _next_events(self, ep, clock) -> list:
        """Events after a pass: poll for the adaptive window, then sleep up to LINGER; [] if none came
        or if a trio task is ready to run (it must not wait for our sleep; a poll window it may wait)."""
        events = ep.poll(0, 512)
        if events:
            return events
        pw = self.poll
        start = clock()
        if pw.window:
            end = start + pw.window
            yield_cpu = os.sched_yield
            while True:
                yield_cpu()  # a runnable peer on this CPU goes first: it may be the one about to send
                events = ep.poll(0, 512)
                if events:
                    pw.waited(clock() - start)
                    return events
                if clock() >= end:
                    break
        if current_statistics().tasks_runnable:  # asked only before sleeping: it costs ~1.5 us
            return []
        events = ep.poll(LINGER, 512)  # wait here a little: the reply is usually on its way
        pw.waited(clock() - start if events else float("inf"))
        return events
