"""A connected client as the bus core sees it: identity, names, rules, outbox.

The outbox is plain data (buffers + fds). The I/O shell installs ``wake``
(called when the outbox gains data) and ``kill`` (called when the core decides
to disconnect the peer); nothing here performs I/O.
"""

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Creds:
    """Kernel-reported identity, taken once at accept (never from the client)."""

    uid: int
    gids: tuple[int, ...] = ()
    pid: int = 0
    label: str | None = None


class FdRef:
    """Fds of one received message, shared by every copy that is queued.

    Multicast sends the same open files to N receivers; the broker's copies
    are closed once the last queued copy has been written or dropped.
    """

    __slots__ = ("fds", "refs")

    def __init__(self, fds: list[int]):
        self.fds = fds
        self.refs = 1

    def incref(self) -> None:
        self.refs += 1

    def decref(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            from ..payload.closer import closer  # a FUSE file's close may block: not on the loop

            closer.close_all(self.fds)
            self.fds = []


@dataclass
class UserAccount:
    """Per-uid totals, so one user's clients cannot starve another user."""

    uid: int
    connections: int = 0
    inflight_fds: int = 0
    outgoing_bytes: int = 0


# An item that stays queued and keeps alive more memory than it sends is
# copied out into bytes of its own when it sends at most this much; a larger
# one is charged what it keeps alive instead (see settle()).
COPY_MAX = 64 * 1024


class OutItem:
    """One queued message: the ``buffers`` sendmsg writes (``nbytes`` in all) and its fds.

    ``buffers`` may be views of the sender's receive buffer (forwarding never
    copies), and a view keeps the whole buffer alive. ``charge`` is what the
    queue is charged for the item: ``nbytes`` until :func:`settle` has seen it
    stay queued, then the memory it really keeps (see :meth:`Peer.settle_outbox`).
    The same ``buffers`` list may be shared by the copies of one broadcast.
    """

    __slots__ = ("buffers", "charge", "fdref", "nbytes", "owner", "settled")

    def __init__(self, buffers, nbytes, fdref, owner):
        self.buffers = buffers
        self.nbytes = nbytes
        self.charge = nbytes
        self.settled = False
        self.fdref = fdref
        self.owner = owner  # UserAccount charged for the fds, or None


def pinned_bytes(buffers) -> int:
    """Memory ``buffers`` keep alive: their own bytes, and for a view the whole buffer it is a view of."""
    total = 0
    objs = []
    for b in buffers:
        if type(b) is memoryview:
            obj = b.obj
            if not any(o is obj for o in objs):
                objs.append(obj)
                total += len(obj)
        else:
            total += len(b)
    return total


def settle(item: OutItem) -> int:
    """Make ``item``, which stays queued, keep no more than it is charged for; returns the new charge.

    Its pieces are views of a receive buffer that may be far larger than the
    item (a small message in a shared 64 KiB buffer). A small item is copied
    out into one bytes object, so the buffer is freed as soon as nothing else
    uses it; a large one (over COPY_MAX) is charged the whole buffer instead
    (the framer gives a large message a buffer of its own, at most a
    sixteenth larger than it, so that is its own size plus the header bytes
    the bus left out and that slack), unless that is over an eighth more
    than it sends: then it is copied too. The router checked the limits
    against ``nbytes``, so a queue's charge may exceed its limit by that
    eighth of one message; the next message is then refused. A ``buffers``
    list shared with other queued copies is replaced in place: they are the
    same bytes, so one copy serves them all.
    """
    item.settled = True
    bufs = item.buffers
    nbytes = item.nbytes
    if nbytes <= COPY_MAX:
        for b in bufs:
            if type(b) is memoryview and len(b.obj) > nbytes:
                bufs[:] = [b"".join(bufs)]
                break
        return nbytes
    kept = pinned_bytes(bufs)
    if kept > nbytes + (nbytes >> 3):
        # The framer reads a large message still coming in into a buffer at most a sixteenth larger,
        # so only one whose header fields the bus stripped (unknown fields), or one that arrived
        # whole in a larger free buffer, gets here: copying costs the broker less than what the
        # sender sent it, and leaves no charge above what the limit check saw.
        bufs[:] = [b"".join(bufs)]
        return nbytes
    return max(nbytes, kept)


@dataclass(eq=False)
class Peer:
    id: int
    creds: Creds
    account: UserAccount
    unix_fds: bool = True
    unique_name: str | None = None
    names: set = field(default_factory=set)
    matches: list = field(default_factory=list)
    monitor: bool = False
    monitor_rules: list = field(default_factory=list)
    outbox: deque = field(default_factory=deque)
    out_bytes: int = 0
    out_fds: int = 0  # fds queued in the outbox (max_outgoing_unix_fds)
    replies_pending: int = 0  # calls this peer made that still await a reply
    closed: bool = False  # disconnected from the bus
    dying: bool = False  # being disconnected: takes and sends nothing more
    stats: dict = field(default_factory=lambda: {"in_messages": 0, "out_messages": 0, "in_bytes": 0})
    wake: object = None
    kill: object = None

    def describe(self) -> str:
        """For log lines: who this is, in terms a sysadmin can act on."""
        c = self.creds
        return (
            f"{self.unique_name or '(no Hello)'} uid={c.uid} pid={c.pid} "
            f"label={c.label or '-'}"
        )

    def enqueue(self, item: OutItem) -> None:
        self.outbox.append(item)
        self.out_bytes += item.charge
        self.account.outgoing_bytes += item.charge
        if item.fdref is not None:
            self.out_fds += len(item.fdref.fds)
            if item.owner is not None:
                item.owner.inflight_fds += len(item.fdref.fds)

    def item_done(self, item: OutItem) -> None:
        """Called by the I/O shell when ``item`` was written (or dropped)."""
        self.out_bytes -= item.charge
        self.account.outgoing_bytes -= item.charge
        if item.fdref is not None:
            self.out_fds -= len(item.fdref.fds)
            if item.owner is not None:
                item.owner.inflight_fds -= len(item.fdref.fds)
            item.fdref.decref()

    def settle_outbox(self) -> None:
        """Called by the I/O shell when a write left items queued (the socket is full).

        Items that go out at once are never looked at: only those that stay
        are settled (:func:`settle`), each once, so what the outbox keeps
        alive is what it is charged for, and the outgoing limits bound the
        broker's real memory. Unsettled items are the newest ones: walk back
        from the tail to the first settled item.
        """
        fresh = []
        for item in reversed(self.outbox):
            if item.settled:
                break
            fresh.append(item)
        for item in fresh:
            charge = settle(item)
            if charge != item.charge:
                extra = charge - item.charge
                item.charge = charge
                self.out_bytes += extra
                self.account.outgoing_bytes += extra

    def drop_outbox(self) -> None:
        while self.outbox:
            self.item_done(self.outbox.popleft())
