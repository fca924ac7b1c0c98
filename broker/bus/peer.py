"""A connected client as the bus core sees it: identity, names, rules, outbox.

The outbox is plain data (buffers + fds). The I/O shell installs ``wake``
(called when the outbox gains data) and ``kill`` (called when the core decides
to disconnect the peer), and closes the fds the core is done with (see
``FdRef``); nothing here performs I/O.
"""

from collections import deque
from dataclasses import dataclass, field
from types import MappingProxyType

from .lifecycle import ACTIVE, CLOSING, GONE, PeerState, transition


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
    are released once the last queued copy has been written or dropped. The
    core never closes them itself (a FUSE file's close may block): it appends
    ``(fds, sender)`` to ``sink``, the bus's declared ``closing`` list, which
    the I/O shell drains after each routing pass. ``sender`` is the Peer
    charged for their closing (None: the bus's own fds).
    """

    __slots__ = ("fds", "owner", "refs", "sender", "sink")

    def __init__(self, fds: list[int], sink: list, sender=None, owner: "UserAccount | None" = None):
        self.fds = fds
        self.refs = 1
        self.sink = sink  # the bus's list of fds the I/O shell must close
        self.sender = sender
        self.owner = owner  # the user whose fd share these count against until they are released
        if owner is not None:
            owner.charge_fds(len(fds))

    def incref(self) -> None:
        self.refs += 1

    def decref(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            self.sink.append((self.fds, self.sender))
            if self.owner is not None:
                self.owner.charge_fds(-len(self.fds))
                self.owner = None
            self.fds = []


class FdQuota:
    """The fds clients can make the broker hold, shared fairly among the users holding some.

    ``pool`` is the broker's RLIMIT_NOFILE less a reserve it keeps for itself
    (listeners, accepting and serving connections). A user may hold at most
    what is left of the pool (its own fds counted as left) divided by the
    number of users holding fds plus one, itself counted if it holds none yet
    (dbus-broker's user quotas work the same way). A user alone gets half;
    every further user gets a share of what the others left, so whatever N
    users do, part of the pool stays free and a newcomer still gets a share.
    Charged are the fds themselves, once however many receivers a message
    goes to: those of a received message until its last queued copy is
    written or dropped (FdRef), and those held in a receive buffer for a
    message still in progress.
    """

    __slots__ = ("closing", "pool", "used", "users")

    def __init__(self, pool: int = 1 << 30):
        self.pool = pool
        self.used = 0  # fds charged to any user
        self.users = 0  # users holding at least one
        # fds the I/O shell was handed to close and has not closed yet (its worker threads close
        # the kinds whose close may block): still the broker's fds, so they count against the pool
        # and against the share of the uid that sent them. The shell sets an object with
        # ``pending`` (all such fds) and ``charged`` (a mapping uid -> fds); None: none held.
        self.closing = None

    def closing_fds(self, uid: int) -> int:
        """Fds ``uid`` sent that still wait for a close."""
        c = self.closing
        return c.charged.get(uid, 0) if c is not None else 0

    def holds(self, acct: "UserAccount") -> int:
        """Every fd of the broker's that ``acct`` makes it hold now."""
        return acct.message_fds + acct.held_fds + self.closing_fds(acct.uid)

    def share(self, acct: "UserAccount") -> int:
        """How many fds ``acct`` may hold now."""
        held = self.holds(acct)
        c = self.closing
        users = self.users
        free = self.pool - self.used
        if c is not None:
            free -= c.pending
            # uids with fds waiting for a close count as holders too (a uid counted twice, when it also
            # holds message fds, only makes every share smaller)
            users += len(c.charged) - (None in c.charged)
        return (free + held) // (users + (not held) + 1)

    def refuses(self, acct: "UserAccount", n: int) -> bool:
        return self.holds(acct) + n > self.share(acct)


@dataclass
class UserAccount:
    """Per-uid totals, so one user's clients cannot starve another user."""

    uid: int
    connections: int = 0
    inflight_fds: int = 0  # queued towards other peers, per queued copy (max_inflight_fds_per_user)
    outgoing_bytes: int = 0
    # the broker's fds this user holds (FdQuota): of received messages not yet sent or dropped,
    # and in receive buffers for messages still in progress
    message_fds: int = 0
    held_fds: int = 0
    quota: FdQuota | None = None
    # messages and StartServiceByName calls waiting for a service to start (bus/activation.py)
    pending_starts: int = 0
    start_bytes: int = 0

    def charge_fds(self, messages: int = 0, held: int = 0) -> None:
        """Add (or with negative numbers return) fds to this user's share of the bus's fd pool."""
        before = self.message_fds + self.held_fds
        self.message_fds += messages
        self.held_fds += held
        q = self.quota
        if q is not None:
            after = self.message_fds + self.held_fds
            q.used += after - before
            if not before and after:
                q.users += 1
            elif before and not after:
                q.users -= 1


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


_NO_ENTRIES = MappingProxyType({})


def no_entries() -> MappingProxyType:
    """The empty, read-only table a peer holds until its first match rule or awaited start: most peers
    have none, and an empty dict costs 64 bytes per table (bus/matches.py and bus/activation.py make
    their own at the first entry)."""
    return _NO_ENTRIES


@dataclass(eq=False)
class Peer:
    id: int
    creds: Creds
    account: UserAccount
    unix_fds: bool = True
    unique_name: str | None = None
    names: set | frozenset = frozenset()  # its well-known names: a set from its first one (bus/names.py)
    matches: dict = field(default_factory=no_entries)  # MatchRule -> None: its rules (bus/matches.py)
    monitor: bool = False
    monitor_rules: list | tuple = ()
    outbox: deque | tuple = ()  # () while nothing was queued since the last release_idle: idle peers hold no deque
    out_bytes: int = 0
    out_fds: int = 0  # fds queued in the outbox (max_outgoing_unix_fds)
    replies_pending: int = 0  # calls this peer made that still await a reply
    state: PeerState = ACTIVE  # bus/lifecycle.py; changed only by ``to`` (ACTIVE is false: `if peer.state:`)
    reason: str | None = None  # why it is closing (the first reason given on the way out)
    # counters GetConnectionStats reports (``stats``): fields, not a dict, as they move with every message
    in_messages: int = 0
    in_bytes: int = 0
    out_messages: int = 0
    wake: object = None
    kill: object = None
    # this peer's own share of the bus registries, so that its cleanup walks only what it owns
    calls: dict = field(default_factory=dict)  # serial -> ReplySlot: its calls awaiting a reply (bus/replies.py)
    owed: dict = field(default_factory=dict)  # ReplySlot -> None: others' calls awaiting its reply
    match_keys: dict = field(default_factory=no_entries)  # MatchRule.key() -> [its rules of that key] (RemoveMatch)
    starts: dict = field(default_factory=no_entries)  # Waiter -> None: what it waits on being started (activation)

    @property
    def stats(self) -> dict:
        """Its message counters, by the names GetConnectionStats gives them."""
        return {"in_messages": self.in_messages, "out_messages": self.out_messages, "in_bytes": self.in_bytes}

    def describe(self) -> str:
        """For log lines: who this is, in terms a sysadmin can act on."""
        c = self.creds
        return f"{self.unique_name or '(no Hello)'} uid={c.uid} pid={c.pid} label={c.label or '-'}"

    # -- lifecycle (bus/lifecycle.py) ---------------------------------------

    def to(self, new: PeerState, reason: str | None = None) -> None:
        """Move to ``new`` (raises LifecycleError if the table forbids it), recording the first reason."""
        self.state = transition(self.state, new)
        if reason is not None and self.reason is None:
            self.reason = reason

    def begin_closing(self, reason: str) -> bool:
        """ACTIVE → CLOSING: it takes and sends nothing more, its outbox is dropped now. False if not ACTIVE."""
        if self.state:
            return False
        self.to(CLOSING, reason)
        self.drop_outbox()
        return True

    @property
    def dying(self) -> bool:
        """Read-only alias kept for tests and unmerged branches: not ACTIVE (use ``state``)."""
        return bool(self.state)

    @property
    def closed(self) -> bool:
        """Read-only alias kept for tests and unmerged branches: GONE (use ``state``)."""
        return self.state is GONE

    def enqueue(self, item: OutItem) -> None:
        ob = self.outbox
        if type(ob) is tuple:
            ob = self.outbox = deque()
        ob.append(item)
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

    def release_idle(self) -> None:
        """Give up the empty outbox (a deque costs ~600 bytes): called for peers that went quiet."""
        if not self.outbox:
            self.outbox = ()

    def drop_outbox(self) -> None:
        while self.outbox:
            self.item_done(self.outbox.popleft())
