"""One client connection: SASL, then batched reads into the framer and
batched, non-blocking scatter/gather writes of the peer's outbox.

Hot path design: a read takes whatever the kernel has (many messages per
``recvmsg_into``), every complete message is routed, and only when every
ready connection of the reactor's pass was read are the peers that gained
output flushed, each with as few ``sendmsg`` calls as the fd boundaries
allow. A peer whose socket is full is watched for EPOLLOUT by the reactor
and written when it drains; nobody else waits for it.
"""

import errno
import logging
import socket

import trio

from ..bus.lifecycle import ACTIVE, AUTHENTICATING, GONE, PeerState, transition
from ..bus.log_fields import AUTH_FAILED, DENIED, LIMIT, about
from ..bus.peer import Peer
from ..payload.closer import closer
from ..wire.errors import WireError
from ..wire.framer import Framer
from ..wire.message import FIXED_HEADER_SIZE, METHOD_CALL, HeaderView, error_message, message_size
from ..wire.sasl import SaslServer
from .sysio import ANC_SPACE, MAX_IOV, MSG_CMSG_CLOEXEC, fds_from_ancdata, recv, send

log = logging.getLogger("sealbus.io")

LIMITS_EXCEEDED = "org.freedesktop.DBus.Error.LimitsExceeded"
REFUSED_HELLO_MAX = 4096  # a connection refused for a limit reads at most this much (its Hello) before closing
MAX_BATCH_BYTES = 4 * 1024 * 1024
_DISCONNECT_ERRNOS = {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ETOOMANYREFS}


def close_fds(fds, creds=None) -> bool:
    """Close received fds; kinds whose close may block (FUSE files...) go to worker threads, charged to
    the sender's uid (``creds``). True if that uid now has more queued than its share."""
    return closer.close_all(fds, creds.uid if creds is not None else None)


def drain_closing(bus) -> None:
    """Perform the core's close actions (``bus.closing``, see ``FdRef``), after each routing pass.

    Fds waiting for a worker's close are still the broker's: they count
    against the sending uid's fd share (``FdQuota.closing``). A sender whose
    uid then holds more than its share, or has more fds waiting for a close
    than ``closer.uid_share``, is disconnected: the broker already holds
    every fd it was sent, so refusing its messages would free nothing while
    the client kept sending more (every refused fd is one more to close);
    the server also refuses that uid's new connections until the charge
    drains.
    """
    closing = bus.closing
    quota = bus.fd_quota
    while closing:
        batch = closing[:]
        closing.clear()
        for fds, sender in batch:
            if sender is None:
                closer.close_all(fds)
                continue
            over = closer.close_all(fds, sender.creds.uid)
            if sender.state:  # not ACTIVE: already leaving
                continue
            if over or (quota.closing_fds(sender.creds.uid) and quota.refuses(sender.account, 0)):
                uid = sender.creds.uid
                bus.kill(sender, f"uid {uid} has {closer.charged.get(uid, 0)} fds waiting to be closed and holds "
                         f"{quota.holds(sender.account)} of its {quota.share(sender.account)} fds (fd share): "
                         "they do not close as fast as it sends them")  # fmt: skip


class Connection:
    """Authentication runs as a trio task; afterwards the connection is served
    by the server's :class:`Reactor` through ``on_readable``/``on_writable``."""

    def __init__(self, server, sock: socket.socket, creds):
        self.server = server
        self.bus = server.bus
        self.sock = sock
        self.fd = sock.fileno()
        self.creds = creds
        self.peer: Peer | None = None
        self.framer: Framer | None = None
        self.head_sent = 0  # bytes of the head outbox item already written
        # AUTHENTICATING, then GONE (failed, refused, evicted) or ACTIVE: from then on its Peer holds
        # the client's state (``state``), this one is never read again (bus/lifecycle.py)
        self._state = AUTHENTICATING
        self.held_fds = 0  # fds of a message in progress, charged to the user's fd share

    # -- lifecycle ----------------------------------------------------------

    @property
    def state(self) -> PeerState:
        """The client's lifecycle state (bus/lifecycle.py): the connection's own until the bus admits
        it, then its Peer's, so that there is one holder at a time."""
        peer = self.peer
        return self._state if peer is None else peer.state

    async def run(self) -> None:
        """Authenticate, then hand the socket to the reactor (and return)."""
        if self._state is GONE:  # evicted before its task first ran
            return
        try:
            sasl = await self._authenticate()
            refusal = None if sasl is None else self.bus.refusal(self.creds)
            if refusal is not None:
                kind, why = refusal
                log.warning("refused connection uid=%d pid=%d label=%s: %s",
                            self.creds.uid, self.creds.pid, self.creds.label or "-", why,
                            extra=about(LIMIT if kind == "limit" else DENIED, self.creds))  # fmt: skip
                if kind == "limit":  # as dbus-daemon: authenticated, then Hello answered with LimitsExceeded
                    await self._refuse_hello(sasl.leftover, why)
                sasl = None
        except BaseException:
            self._close_unauthenticated()
            raise
        finally:
            self.server.authentication_ended(self)
        if sasl is None or self._state is GONE:  # failed, timed out, or evicted while it waited
            self._close_unauthenticated()
            return
        self._state = transition(self._state, ACTIVE)  # its Peer holds the state from now on
        self.peer = self.bus.connect(self.creds, unix_fds=sasl.unix_fd)
        self.peer.wake = self.server.wake
        self.peer.kill = self._on_kill
        self.server.connections[self.peer] = self
        lim = self.bus.limits
        self.framer = Framer(lim.max_message_size, lim.max_message_unix_fds)
        self.server.reactor.unwatch(self.fd)  # from now on the reactor serves it
        self.server.reactor.add(self)
        if sasl.leftover:
            self.framer.push(sasl.leftover)
            self._process()
            self.server.flush_dirty()
            self.framer.release_idle_buffer()
            self.server.reactor.finish_closing()

    def _close_unauthenticated(self) -> None:
        if self._state is GONE:
            return  # evicted: closed already; its fd number may belong to a newer connection by now
        self._state = transition(self._state, GONE)
        self.server.reactor.unwatch(self.fd)
        self.sock.close()

    def evict(self) -> None:
        """Close this unauthenticated connection now; its task, if waiting on the socket, ends."""
        self._state = transition(self._state, GONE)  # raises if it is not AUTHENTICATING
        self.server.reactor.unwatch(self.fd)
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()

    def describe(self) -> str:
        if self.peer is not None:
            return self.peer.describe()
        return f"uid={self.creds.uid} pid={self.creds.pid} label={self.creds.label or '-'}"

    def _on_kill(self, reason: str) -> None:
        """``Peer.kill``: the bus moved the peer to CLOSING (``Bus.kill``); close after the current pass."""
        self.server.reactor.schedule_close(self)

    def hang_up(self, reason: str) -> None:
        """The client left or its socket failed: ACTIVE → CLOSING (no warning logged), closed after the pass."""
        if self.peer.begin_closing(reason):
            self.server.reactor.schedule_close(self)

    def close(self) -> None:
        """Close the socket; an admitted client is disconnected from the bus. → GONE; a no-op once GONE."""
        if self.state is GONE:
            return
        self.server.reactor.remove(self)
        try:
            if self.peer is None:
                self._state = transition(self._state, GONE)
            else:
                self.server.connections.pop(self.peer, None)
                self.server.fds_claimed(self)
                if self.held_fds:
                    self.peer.account.charge_fds(0, -self.held_fds)
                    self.held_fds = 0
                close_fds(self.framer.close(), self.creds)
                self.bus.disconnect(self.peer, self.peer.reason or "connection closed")  # → GONE
        finally:
            self.sock.close()
        self.server.flush_dirty()

    # -- authentication -----------------------------------------------------

    async def _authenticate(self) -> SaslServer | None:
        sasl = SaslServer(self.creds.uid, self.bus.guid, unix_fd_supported=True)
        timeout = self.bus.limits.auth_timeout / 1000
        with trio.move_on_after(timeout) as cs:
            while not sasl.done:
                data = await self._recv_plain()
                if not data:
                    return None
                try:
                    out = sasl.feed(data)
                except WireError as e:
                    log.warning("authentication failed for %s: %s", self.describe(), e,
                                extra=about(AUTH_FAILED, self.creds))  # fmt: skip
                    return None
                if out:
                    await self._send_plain(out)
        if cs.cancelled_caught:
            log.warning("authentication timeout for %s", self.describe(), extra=about(AUTH_FAILED, self.creds))
            return None
        return sasl

    async def _refuse_hello(self, leftover: bytes, why: str) -> None:
        """Answer the first message (Hello) with LimitsExceeded, for at most auth_timeout more; the
        connection stays an incomplete one (never a peer) until then and is closed afterwards. A Hello is
        ~130 bytes: a first message over 4 KiB, or with fds, ends it at once (as cheap as SASL lines)."""
        buf = bytearray(leftover)
        with trio.move_on_after(self.bus.limits.auth_timeout / 1000):
            try:
                while len(buf) < FIXED_HEADER_SIZE or len(buf) < message_size(buf, REFUSED_HELLO_MAX):
                    if len(buf) > REFUSED_HELLO_MAX or not (data := await self._recv_plain()):
                        return
                    buf += data
                h = HeaderView(bytes(buf[: message_size(buf, REFUSED_HELLO_MAX)]), REFUSED_HELLO_MAX)
            except WireError:
                return
            if h.type == METHOD_CALL and not h.no_reply_expected:
                await self._send_plain(error_message(1, h.serial, None, LIMITS_EXCEEDED, why))

    async def _recv_plain(self) -> bytes:
        while True:
            try:
                data, anc, _flags, _ = self.sock.recvmsg(4096, ANC_SPACE, MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                self.server.reactor.trio_done(self.fd)
                try:
                    await trio.lowlevel.wait_readable(self.sock)
                except trio.ClosedResourceError:  # evicted
                    return b""
                continue
            except OSError:
                return b""
            if anc:
                close_fds(fds_from_ancdata(anc), self.creds)
                log.warning("fds sent during authentication by %s", self.describe(),
                            extra=about(AUTH_FAILED, self.creds))  # fmt: skip
                return b""
            return data

    async def _send_plain(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = self.sock.send(view)
            except BlockingIOError:
                try:
                    await trio.lowlevel.wait_writable(self.sock)
                except trio.ClosedResourceError:  # evicted
                    return
                continue
            except OSError:
                return
            view = view[n:]

    # -- reading --------------------------------------------------------------

    def on_readable(self) -> None:
        """One read (as much as the buffer takes), then route every complete message."""
        framer = self.framer
        if framer.checking is not None:
            return  # not read while a message of it is being validated: the reactor steps it (validate_step)
        peer = self.peer
        buf = framer.recv_buffer()
        try:
            n, fds, truncated = recv(self.fd, self.sock, buf)
        except BlockingIOError:
            return
        except OSError as e:
            self.hang_up(f"read error: {e.strerror}")
            return
        finally:
            buf.release()  # our view of the free space must not pin the buffer
        if truncated:
            close_fds(fds, self.creds)
            self.bus.kill(peer, "control data truncated (too many fds in one read)")
            return
        if fds and not peer.unix_fds:
            close_fds(fds, self.creds)
            self.bus.kill(peer, "sent fds without negotiating Unix fd passing")
            return
        if n == 0:
            close_fds(fds, self.creds)
            self.hang_up("")
            return
        framer.commit(n, fds)
        held = self.held_fds
        if held:  # they may be claimed now; charged again below if not
            self.held_fds = 0
            peer.account.charge_fds(0, -held)
        self._process()
        if framer.fds:
            self._hold_fds()
        elif held:
            self.server.fds_claimed(self)
        # No flush here: the reactor flushes once every ready connection was read, so messages
        # that several peers sent to one receiver in this pass leave in one sendmsg.
        self.server.reactor.touched.add(self)  # its buffer is given back once it stops reading

    def _hold_fds(self) -> None:
        """Fds left after every complete message took its own: the message in progress may claim
        them, within the user's fd share, until pending_fd_timeout; any other fd is a violation."""
        peer = self.peer
        if peer.state:
            return  # not ACTIVE: its fds are closed with the framer
        try:
            self.framer.check_fds()
        except WireError as e:
            self.bus.kill(peer, f"protocol violation: {e}")
            return
        n = len(self.framer.fds)
        if self.bus.fd_quota.refuses(peer.account, n):
            self.bus.kill(peer, f"{n} fds of a message in progress exceed uid {peer.creds.uid}'s fd share")
            return
        peer.account.charge_fds(0, n)
        self.held_fds = n
        self.server.hold_fds(self)

    def _process(self) -> None:
        """Route every complete message in the buffer; stop at one whose large body is being validated
        in steps (the reactor takes one step of it per pass, between other connections' work)."""
        peer = self.peer
        bus = self.bus
        framer = self.framer
        try:
            while not peer.state:  # ACTIVE
                msg = framer.next_message()
                if msg is None:
                    if framer.checking is not None:
                        self.server.reactor.validating.add(self)
                    return
                bus.dispatch(peer, msg)
        except WireError as e:
            self.bus.kill(peer, f"protocol violation: {e}")

    def validate_step(self) -> None:
        """One step of the validation of this connection's large message; then, if it is done, the
        message and whatever complete messages follow it are routed, and reading resumes."""
        framer = self.framer
        peer = self.peer
        held = self.held_fds
        if held:
            self.held_fds = 0
            peer.account.charge_fds(0, -held)
        self._process()
        if framer.checking is None:
            self.server.reactor.validating.discard(self)
        if framer.fds:
            self._hold_fds()
        elif held:
            self.server.fds_claimed(self)

    # -- writing --------------------------------------------------------------

    def on_writable(self) -> None:
        self.flush()

    def flush(self) -> None:
        """Write as much of the outbox as the socket takes now, never blocking.

        Queued items are views of their senders' receive buffers; whatever a
        write leaves queued is settled (``Peer.settle_outbox``) so that it
        keeps no more memory alive than the queue is charged for. Items that
        go out at once cost nothing extra."""
        peer = self.peer
        ob = peer.outbox
        sock = self.sock
        while ob:
            head = ob[0]
            fds = None
            if self.head_sent:
                iov = self._gather(ob)
            elif head.fdref is not None:  # a message with fds goes alone, its fds with its first byte
                iov = head.buffers
                fds = head.fdref.fds
            elif len(ob) == 1:
                iov = head.buffers  # the common case: one message, nothing of it written yet
            else:
                iov = self._gather(ob)
            try:
                n = send(self.fd, sock, iov, fds)
            except BlockingIOError:
                peer.settle_outbox()  # what stays queued must not pin more than it is charged for
                self.server.reactor.want_write(self)
                return
            except OSError as e:
                if e.errno in _DISCONNECT_ERRNOS:
                    self.hang_up(f"write error: {e.strerror}")
                    peer.drop_outbox()
                    return
                raise
            n += self.head_sent
            while ob and n >= ob[0].nbytes:
                item = ob.popleft()
                n -= item.nbytes
                peer.item_done(item)
            self.head_sent = n
            if n and ob:
                # partial write: the socket is full; continue when writable
                peer.settle_outbox()
                self.server.reactor.want_write(self)
                return
        if self.fd in self.server.reactor.writing:
            self.server.reactor.write_done(self)

    def _gather(self, ob) -> list:
        """Buffers of as many queued messages as one sendmsg takes: up to the next message
        with fds, MAX_IOV pieces or MAX_BATCH_BYTES; the part of the head already written is left out."""
        iov = []
        items = total = 0
        skip = self.head_sent
        for item in ob:
            if items and item.fdref is not None:
                break
            for b in item.buffers:
                if skip:
                    if skip >= len(b):
                        skip -= len(b)
                        continue
                    b = memoryview(b)[skip:]
                    skip = 0
                iov.append(b)
            items += 1
            total += item.nbytes
            if len(iov) >= MAX_IOV or total >= MAX_BATCH_BYTES:
                break
        return iov
