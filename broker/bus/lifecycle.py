"""One client's lifecycle: a named state and the one table of its legal transitions.

::

    AUTHENTICATING ──authenticated, admitted──▶ ACTIVE ──kill / EOF / I/O error──▶ CLOSING
          │                                       │                                  │
          │ failed, timed out, refused, evicted   │ disconnect                       │ the shell closes
          ▼                                       ▼                                  ▼ the socket: disconnect
         GONE ◀───────────────────────────────────┴──────────────────────────────────┘

- AUTHENTICATING: the SASL exchange; only the I/O shell's ``Connection`` knows
  the client, the bus has no ``Peer`` for it yet.
- ACTIVE: a ``Peer`` on the bus: it sends and takes messages.
- CLOSING: killed or hung up, with a reason; its outbox was dropped, it takes
  and sends nothing more, and it is still registered on the bus until the
  shell closes the socket after the current routing pass (so no registry is
  changed while the router iterates it).
- GONE: disconnected from the bus (names, rules, replies released) or, never
  admitted, its socket closed. Terminal.

``ACTIVE`` is 0 and every other state is true, so the per-message test on the
hot path stays one attribute test: ``if peer.state:`` means "not active".

Who checks before moving: ``Bus.disconnect`` and ``Bus.kill`` are no-ops on a
peer already past the state they move to (disconnect twice is fine); the
table itself refuses anything else, as h11 does: an illegal transition is a
bug and raises :class:`LifecycleError`.
"""

from enum import IntEnum


class PeerState(IntEnum):
    ACTIVE = 0  # the only false state: `if peer.state:` is "not active"
    AUTHENTICATING = 1
    CLOSING = 2
    GONE = 3


AUTHENTICATING = PeerState.AUTHENTICATING
ACTIVE = PeerState.ACTIVE
CLOSING = PeerState.CLOSING
GONE = PeerState.GONE

# state -> the states it may move to
TRANSITIONS: dict[PeerState, frozenset[PeerState]] = {
    AUTHENTICATING: frozenset({ACTIVE, GONE}),
    ACTIVE: frozenset({CLOSING, GONE}),
    CLOSING: frozenset({GONE}),
    GONE: frozenset(),
}


class LifecycleError(RuntimeError):
    """An illegal lifecycle transition: a bug in the broker, never a client's doing."""


def transition(old: PeerState, new: PeerState) -> PeerState:
    """``new`` if the table allows ``old`` → ``new``; raises LifecycleError otherwise."""
    if new not in TRANSITIONS[old]:
        raise LifecycleError(f"illegal lifecycle transition {old.name} -> {new.name}")
    return new
