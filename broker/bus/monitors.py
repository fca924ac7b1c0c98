"""Monitors (org.freedesktop.DBus.Monitoring.BecomeMonitor): peers that see traffic and send nothing.

A monitor has given up its names and rules; it keeps only its monitor rules
(none: it sees everything). Adding and removing one is O(1); which monitors
want a message is decided here, delivering it is the router's.
"""

from .match import rule_hits


class Monitors:
    def __init__(self):
        self.peers: dict = {}  # Peer -> None, in the order they became monitors

    def __len__(self) -> int:
        return len(self.peers)

    def __iter__(self):
        return iter(self.peers)

    def add(self, peer, rules: list) -> None:
        peer.monitor = True
        peer.monitor_rules = rules
        self.peers[peer] = None

    def remove(self, peer) -> None:
        self.peers.pop(peer, None)

    def wanting(self, h, sender_name: str, body, owners) -> list:
        """The monitors that want ``h`` (sent by ``sender_name``; ``owners``: name -> unique name;
        ``body.get()``: its arguments, unmarshalled at most once)."""
        out = []
        for mon in self.peers:
            rules = mon.monitor_rules
            if not rules or any(rule_hits(r, h, owners, sender_name, body) for r in rules):
                out.append(mon)
        return out
