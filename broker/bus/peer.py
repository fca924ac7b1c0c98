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


class OutItem:
    __slots__ = ("buffers", "fdref", "nbytes", "owner")

    def __init__(self, buffers, nbytes, fdref, owner):
        self.buffers = buffers
        self.nbytes = nbytes
        self.fdref = fdref
        self.owner = owner  # UserAccount charged for the fds, or None


@dataclass(eq=False)
class Peer:
    id: int
    creds: Creds
    account: UserAccount
    unix_fds: bool = True
    unique_name: str | None = None
    names: set = field(default_factory=set)
    matches: dict = field(default_factory=dict)  # MatchRule -> None: its rules (bus/matches.py)
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
    # this peer's own share of the bus registries, so that its cleanup walks only what it owns
    calls: dict = field(default_factory=dict)  # serial -> ReplySlot: its calls awaiting a reply (bus/replies.py)
    owed: dict = field(default_factory=dict)  # ReplySlot -> None: others' calls awaiting its reply
    match_keys: dict = field(default_factory=dict)  # MatchRule.key() -> [its rules with that key] (RemoveMatch)

    def describe(self) -> str:
        """For log lines: who this is, in terms a sysadmin can act on."""
        c = self.creds
        return (
            f"{self.unique_name or '(no Hello)'} uid={c.uid} pid={c.pid} "
            f"label={c.label or '-'}"
        )

    def enqueue(self, item: OutItem) -> None:
        self.outbox.append(item)
        self.out_bytes += item.nbytes
        self.account.outgoing_bytes += item.nbytes
        if item.fdref is not None:
            self.out_fds += len(item.fdref.fds)
            if item.owner is not None:
                item.owner.inflight_fds += len(item.fdref.fds)

    def item_done(self, item: OutItem) -> None:
        """Called by the I/O shell when ``item`` was written (or dropped)."""
        self.out_bytes -= item.nbytes
        self.account.outgoing_bytes -= item.nbytes
        if item.fdref is not None:
            self.out_fds -= len(item.fdref.fds)
            if item.owner is not None:
                item.owner.inflight_fds -= len(item.fdref.fds)
            item.fdref.decref()

    def drop_outbox(self) -> None:
        while self.outbox:
            self.item_done(self.outbox.popleft())
