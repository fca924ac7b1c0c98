"""One epoll for all authenticated connections, driven by a single trio task.

Why: with a trio task per connection, every readable socket costs a task
wake-up and an epoll re-registration. Here trio waits on one epoll fd; when
it fires, every ready connection is served in the same pass (read, route,
flush), which batches work across peers as well as within one peer. Other
trio tasks (accepting, authentication, the FUSE server, timers) still run:
the reactor yields after every few passes.
"""

import logging
import select

import trio

log = logging.getLogger("sealbus.io")

EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
EPOLL_CLOSE = select.EPOLLHUP | select.EPOLLERR | select.EPOLLRDHUP
PASSES_BEFORE_YIELD = 4


class Reactor:
    def __init__(self, server):
        self.server = server
        self.ep = select.epoll()
        self.conns: dict[int, object] = {}
        self.writing: set[int] = set()
        self.closing: list = []

    def add(self, conn) -> None:
        fd = conn.sock.fileno()
        self.conns[fd] = conn
        self.ep.register(fd, EPOLLIN)

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
        if self.conns.pop(fd, None) is not None:
            self.writing.discard(fd)
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
                conn.close()
            except Exception:
                log.exception("internal error closing %s", conn.describe())

    async def run(self) -> None:
        ep = self.ep
        conns = self.conns
        passes = 0
        try:
            while True:
                # Trio tells us when the epoll fd is readable; then one
                # non-blocking poll hands us every ready connection at once.
                await trio.lowlevel.wait_readable(ep.fileno())
                while True:
                    events = ep.poll(0, 512)
                    if not events:
                        break
                    for fd, ev in events:
                        conn = conns.get(fd)
                        if conn is None or conn.dying:
                            continue
                        try:
                            if ev & EPOLLOUT:
                                conn.on_writable()
                            if ev & (EPOLLIN | EPOLL_CLOSE) and not conn.dying:
                                conn.on_readable()
                        except Exception:
                            # A bug must cost one connection, never the bus.
                            log.exception("internal error serving %s; disconnecting it", conn.describe())
                            conn.dying = True
                            self.closing.append(conn)
                    self.server.flush_dirty()
                    self.finish_closing()
                    if len(events) < 512:
                        break  # most likely idle now; the next wait tells us otherwise
                    passes += 1
                    if passes >= PASSES_BEFORE_YIELD:
                        passes = 0
                        await trio.lowlevel.checkpoint()
                self.finish_closing()
        finally:
            for conn in list(conns.values()):
                conn.close()
            ep.close()
