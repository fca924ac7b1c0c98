"""The bus's match registry: every peer's rules, indexed for lookup, removable one by one in O(1).

Each rule is kept once in an index bucket chosen by the most selective header
field the rule must equal exactly: ``member``, else ``path``, else
``interface``, else a ``sender`` that is a unique name or the bus itself
(whose owner never changes), else a string ``arg0``, else the wildcard
bucket. A message is matched against the buckets of its own member, path,
interface, sender and (if it has one, unmarshalled only when some rule is
keyed on it) string first argument, and the wildcard bucket only, so rules that cannot match it because of one of those
fields cost it nothing. Rules with ``eavesdrop='true'`` live in an index of
their own, which is all that unicast messages (eavesdropping) are matched
against.

A bucket is an insertion-ordered dict keyed by the rule itself (each AddMatch
makes its own :class:`MatchRule` object); the rule knows its bucket, so
removing it is one dict deletion. Each peer keeps its rules (``matches``) and,
for RemoveMatch, its rules by :meth:`MatchRule.key` (``match_keys``, a list
per key: dbus-daemon allows duplicate rules and RemoveMatch removes one).
Disconnect walks the peer's own rules; nothing walks other peers' rules to
remove one.
"""

from .match import MatchRule
from .peer import no_entries

DBUS_NAME = "org.freedesktop.DBus"


class MatchIndex:
    __slots__ = ("by_arg0", "by_interface", "by_member", "by_path", "by_sender", "count", "keyed_other", "wild")

    def __init__(self):
        self.by_member: dict[str, dict] = {}
        self.by_path: dict[str, dict] = {}
        self.by_interface: dict[str, dict] = {}
        self.by_sender: dict[str, dict] = {}
        self.by_arg0: dict[str, dict] = {}
        self.wild: dict[MatchRule, None] = {}
        self.count = 0  # rules in this index
        self.keyed_other = 0  # of those, keyed on path, interface, sender or arg0 (lookups skipped while 0)

    def __len__(self) -> int:
        return self.count

    def add(self, rule: MatchRule) -> None:
        self.count += 1
        if rule.member is not None:
            index, key = self.by_member, rule.member
        elif rule.path is not None:
            index, key = self.by_path, rule.path
        elif rule.interface is not None:
            index, key = self.by_interface, rule.interface
        elif rule.sender is not None and (rule.sender[0] == ":" or rule.sender == DBUS_NAME):
            index, key = self.by_sender, rule.sender
        elif 0 in rule.args:
            index, key = self.by_arg0, rule.args[0]
        else:
            self.wild[rule] = None
            rule.bucket, rule.index, rule.index_key = self.wild, None, None
            return
        if index is not self.by_member:
            self.keyed_other += 1
        bucket = index.get(key)
        if bucket is None:
            bucket = index[key] = {}
        bucket[rule] = None
        rule.bucket, rule.index, rule.index_key = bucket, index, key

    def remove(self, rule: MatchRule) -> None:
        bucket, index = rule.bucket, rule.index
        del bucket[rule]
        self.count -= 1
        if index is not None:
            if index is not self.by_member:
                self.keyed_other -= 1
            if not bucket:
                del index[rule.index_key]
        rule.bucket = rule.index = None

    def buckets(self, h, sender_name: str, body, out: list) -> None:
        """Append to ``out`` the non-empty buckets whose rules may match ``h`` sent by ``sender_name``
        (``body.get()``: its arguments, unmarshalled once and only if an arg0 bucket exists)."""
        if not self.count:
            return
        b = self.by_member.get(h.member)
        if b:
            out.append(b)
        if self.keyed_other:
            self.buckets_other(h, sender_name, body, out)
        if self.wild:
            out.append(self.wild)

    def buckets_other(self, h, sender_name: str, body, out: list) -> None:
        b = self.by_path.get(h.path)
        if b:
            out.append(b)
        b = self.by_interface.get(h.interface)
        if b:
            out.append(b)
        b = self.by_sender.get(sender_name)
        if b:
            out.append(b)
        if self.by_arg0 and h.signature[:1] == "s":  # arg0='v' matches a string first argument only
            args = body.get()
            if args:
                b = self.by_arg0.get(args[0])
                if b:
                    out.append(b)


class MatchRegistry:
    def __init__(self):
        self.index = MatchIndex()  # rules without eavesdrop='true'
        self.eaves = MatchIndex()  # rules with eavesdrop='true'
        self.eavesdroppers: dict = {}  # peer -> number of its eavesdrop='true' rules
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def add(self, peer, rule: MatchRule) -> None:
        rule.owner = peer
        if not peer.matches:  # the shared empty table (bus/peer.py no_entries) until its first rule
            peer.matches, peer.match_keys = {}, {}
        peer.matches[rule] = None
        key = rule.key()
        same = peer.match_keys.get(key)
        if same is None:
            peer.match_keys[key] = [rule]
        else:
            same.append(rule)
        if rule.eavesdrop:
            self.eaves.add(rule)
            self.eavesdroppers[peer] = self.eavesdroppers.get(peer, 0) + 1
        else:
            self.index.add(rule)
        self.count += 1

    def remove(self, peer, rule: MatchRule) -> bool:
        """RemoveMatch: remove one of ``peer``'s rules equal to ``rule`` (the latest added); False if none."""
        key = rule.key()
        same = peer.match_keys.get(key)
        if not same:
            return False
        mine = same.pop()
        if not same:
            del peer.match_keys[key]
        del peer.matches[mine]
        self._unindex(peer, mine)
        return True

    def remove_all(self, peer) -> int:
        """Every rule of ``peer`` (disconnect, BecomeMonitor). Work: its own rules."""
        n = len(peer.matches)
        for rule in peer.matches:
            self._unindex(peer, rule)
        peer.matches = peer.match_keys = no_entries()
        return n

    def _unindex(self, peer, rule: MatchRule) -> None:
        if rule.eavesdrop:
            self.eaves.remove(rule)
            left = self.eavesdroppers[peer] - 1
            if left:
                self.eavesdroppers[peer] = left
            else:
                del self.eavesdroppers[peer]
        else:
            self.index.remove(rule)
        self.count -= 1

    def buckets(self, h, sender_name: str, body, eavesdrop_only: bool) -> list:
        """The non-empty buckets whose rules may match ``h`` sent by ``sender_name`` (eavesdrop
        rules only if ``eavesdrop_only``). Per message: five dict lookups, or none for an index
        that is empty."""
        out = []
        if not eavesdrop_only:
            self.index.buckets(h, sender_name, body, out)
        if self.eavesdroppers:
            self.eaves.buckets(h, sender_name, body, out)
        return out
