"""Well-known name ownership and queueing, exactly as the D-Bus spec describes.

Sans-IO: operations return the list of ownership changes; the router turns
them into NameLost / NameOwnerChanged / NameAcquired signals in that order.
"""

from dataclasses import dataclass

ALLOW_REPLACEMENT, REPLACE_EXISTING, DO_NOT_QUEUE = 0x1, 0x2, 0x4

PRIMARY_OWNER, IN_QUEUE, EXISTS, ALREADY_OWNER = 1, 2, 3, 4
RELEASED, NON_EXISTENT, NOT_OWNER = 1, 2, 3


@dataclass
class Owner:
    peer: object  # the Peer; compared by identity
    flags: int


@dataclass
class OwnerChange:
    """The primary owner of ``name`` changed from ``old`` to ``new`` (peers or None)."""

    name: str
    old: object
    new: object


def _hold(peer, name: str) -> None:
    """``peer`` now owns or queues for ``name``. Its set is made at its first name: most peers own
    none, and an empty set costs 216 bytes (``Peer.names`` is an empty frozenset until then)."""
    if peer.names:
        peer.names.add(name)
    else:
        peer.names = {name}


def _drop(peer, name: str) -> None:
    """``peer`` no longer owns or queues for ``name``; without names left it holds no set again."""
    names = peer.names
    names.discard(name)
    if not names:
        peer.names = frozenset()


class NameRegistry:
    def __init__(self):
        self.queues: dict[str, list[Owner]] = {}

    def owner(self, name: str):
        q = self.queues.get(name)
        return q[0].peer if q else None

    def queued_owners(self, name: str) -> list:
        return [o.peer for o in self.queues.get(name, ())]

    def names(self) -> list[str]:
        return list(self.queues)

    def request(self, name: str, peer, flags: int) -> tuple[int, list[OwnerChange]]:
        q = self.queues.get(name)
        if not q:
            self.queues[name] = [Owner(peer, flags)]
            _hold(peer, name)
            return PRIMARY_OWNER, [OwnerChange(name, None, peer)]
        primary = q[0]
        if primary.peer is peer:
            primary.flags = flags
            return ALREADY_OWNER, []
        mine = next((o for o in q if o.peer is peer), None)
        if (flags & REPLACE_EXISTING) and (primary.flags & ALLOW_REPLACEMENT):
            if mine is not None:
                q.remove(mine)
            q.pop(0)
            if primary.flags & DO_NOT_QUEUE:
                _drop(primary.peer, name)
            else:
                q.insert(0, primary)
            q.insert(0, Owner(peer, flags))
            _hold(peer, name)
            return PRIMARY_OWNER, [OwnerChange(name, primary.peer, peer)]
        if flags & DO_NOT_QUEUE:
            if mine is not None:
                q.remove(mine)
                _drop(peer, name)
            return EXISTS, []
        if mine is not None:
            mine.flags = flags
        else:
            q.append(Owner(peer, flags))
            _hold(peer, name)
        return IN_QUEUE, []

    def release(self, name: str, peer) -> tuple[int, list[OwnerChange]]:
        q = self.queues.get(name)
        if not q:
            return NON_EXISTENT, []
        idx = next((i for i, o in enumerate(q) if o.peer is peer), None)
        if idx is None:
            return NOT_OWNER, []
        q.pop(idx)
        _drop(peer, name)
        changes = []
        if idx == 0:
            new = q[0].peer if q else None
            changes.append(OwnerChange(name, peer, new))
        if not q:
            del self.queues[name]
        return RELEASED, changes

    def release_all(self, peer) -> list[OwnerChange]:
        changes = []
        for name in sorted(peer.names):
            _, ch = self.release(name, peer)
            changes.extend(ch)
        return changes
