"""Monitors (org.freedesktop.DBus.Monitoring.BecomeMonitor): peers that see traffic and send nothing.

A monitor has given up its names and rules; it keeps only its monitor rules
(none: it sees everything). Adding and removing one is O(1); which monitors
want a message is decided here, delivering it is the router's.
"""

from dataclasses import replace

from .match import rule_hits


class Monitors:
    def __init__(self):
        self.peers: dict = {}  # Peer -> None, in the order they became monitors

    def __len__(self) -> int:
        return len(self.peers)

    def __iter__(self):
        return iter(self.peers)

    def add(self, peer, rules: list) -> None:
        """``rules``: parsed match rules. A rule's destination= is kept apart: as in dbus-daemon it names
        the connection a message is addressed to (its unique name or any name it is the primary owner
        of), whichever name the header spells."""
        peer.monitor = True
        peer.monitor_rules = [(replace(r, destination=None), r.destination) if r.destination else (r, None)
                              for r in rules]  # fmt: skip
        self.peers[peer] = None

    def remove(self, peer) -> None:
        self.peers.pop(peer, None)

    def wanting(self, h, sender_name: str, body, owners, recipient: str | None = None) -> list:
        """The monitors that want ``h`` (sent by ``sender_name``; ``owners``: name -> unique name;
        ``body.get()``: its arguments, unmarshalled at most once; ``recipient``: the unique name of the
        connection it is addressed to, None if it goes to the bus, to nobody yet or is a broadcast)."""
        out = []
        for mon in self.peers:
            rules = mon.monitor_rules
            if not rules or any(_hits(r, dest, h, owners, sender_name, body, recipient) for r, dest in rules):
                out.append(mon)
        return out


def _hits(rule, dest, h, owners, sender_name, body, recipient) -> bool:
    """``rule`` (its destination taken out) and ``dest`` (that destination, or None) match ``h``."""
    if dest is not None:
        if h.destination is None:
            return False  # a broadcast
        if recipient is None:
            if dest != h.destination:
                return False
        elif owners(dest) != recipient:
            return False
    return rule_hits(rule, h, owners, sender_name, body)
