"""Match rules: strict parsing of the rule syntax and matching against headers."""

from dataclasses import dataclass, field

from ..wire import name_syntax as names
from ..wire.message import TYPE_NAMES
from ..wire.signature import split_signature

TYPE_CODES = {v: k for k, v in TYPE_NAMES.items()}
MAX_ARG = 63


class MatchRuleInvalid(ValueError):
    """org.freedesktop.DBus.Error.MatchRuleInvalid"""


@dataclass(eq=False, slots=True)
class MatchRule:
    """One parsed rule. Compared by identity: each AddMatch makes its own rule, which is also its
    entry in the bus's match registry (``owner`` and ``bucket`` below, see matches.py); two rules
    that say the same thing have the same :meth:`key`."""

    text: str = ""
    type: int | None = None
    sender: str | None = None
    interface: str | None = None
    member: str | None = None
    path: str | None = None
    path_namespace: str | None = None
    destination: str | None = None
    eavesdrop: bool = False
    args: dict[int, str] = field(default_factory=dict)
    arg_paths: dict[int, str] = field(default_factory=dict)
    arg0namespace: str | None = None
    # registry entry (set by MatchRegistry.add): the peer that added the rule, the index bucket holding it
    owner: object = field(default=None, repr=False)
    bucket: dict | None = field(default=None, repr=False)
    index: dict | None = field(default=None, repr=False)  # the dict holding ``bucket`` (None: never removed)
    index_key: object = field(default=None, repr=False)

    @property
    def needs_body(self) -> bool:
        return bool(self.args or self.arg_paths or self.arg0namespace is not None)

    def key(self) -> tuple:
        """Canonical identity for RemoveMatch (same rule, any spelling)."""
        return (
            self.type, self.sender, self.interface, self.member, self.path,
            self.path_namespace, self.destination, self.eavesdrop,
            tuple(sorted(self.args.items())), tuple(sorted(self.arg_paths.items())),
            self.arg0namespace,
        )  # fmt: skip

    def matches_header(self, h, sender_names, sender: str | None) -> bool:
        """Header-only part. ``sender_names``: callable giving the unique name owning a name;
        ``sender``: the real sender's unique name (never the client's own SENDER field)."""
        if self.type is not None and h.type != self.type:
            return False
        if self.interface is not None and h.interface != self.interface:
            return False
        if self.member is not None and h.member != self.member:
            return False
        if self.path is not None and h.path != self.path:
            return False
        if self.path_namespace is not None:
            ns = self.path_namespace
            p = h.path
            if p is None or not (ns == "/" or p == ns or p.startswith(ns + "/")):
                return False
        if self.destination is not None and h.destination != self.destination:
            return False
        if self.sender is not None and self.sender != sender:
            if self.sender.startswith(":") or sender_names(self.sender) != sender:
                return False
        return True

    def matches_args(self, body: tuple, signature: str) -> bool:
        types = split_signature(signature)
        for i, want in self.args.items():
            if i >= len(types) or types[i] != "s" or body[i] != want:
                return False
        for i, want in self.arg_paths.items():
            if i >= len(types) or types[i] not in "so":
                return False
            got = body[i]
            if got == want:
                continue
            if want.endswith("/") and got.startswith(want):
                continue
            if got.endswith("/") and want.startswith(got):
                continue
            return False
        if self.arg0namespace is not None:
            if not types or types[0] != "s":
                return False
            a = body[0]
            ns = self.arg0namespace
            if not (a == ns or a.startswith(ns + ".")):
                return False
        return True


def _tokenize(text: str) -> list[tuple[str, str]]:  # noqa: C901
    """Split ``key='value',...`` following dbus-daemon's quoting rules."""
    pairs = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t\n":
            i += 1
        if i >= n:
            break
        eq = text.find("=", i)
        if eq < 0:
            raise MatchRuleInvalid(f"match rule {text!r}: key without '=' at offset {i}")
        key = text[i:eq].strip()
        if not key:
            raise MatchRuleInvalid(f"match rule {text!r}: empty key")
        i = eq + 1
        value = []
        quoted = False
        while i < n:
            c = text[i]
            if quoted:
                if c == "'":
                    quoted = False
                else:
                    value.append(c)
            elif c == "'":
                quoted = True
            elif c == "\\" and i + 1 < n and text[i + 1] == "'":
                value.append("'")
                i += 1
            elif c == ",":
                break
            else:
                value.append(c)
            i += 1
        if quoted:
            raise MatchRuleInvalid(f"match rule {text!r}: unterminated quote")
        pairs.append((key, "".join(value)))
        if i < n and text[i] == ",":
            i += 1
            if i >= n:
                raise MatchRuleInvalid(f"match rule {text!r}: trailing comma")
    return pairs


def parse_match_rule(text: str) -> MatchRule:  # noqa: C901
    if len(text) > 1024:
        raise MatchRuleInvalid("match rule longer than 1024 bytes")
    rule = MatchRule(text=text)
    seen = set()
    for key, value in _tokenize(text):
        if key in seen and key != "eavesdrop":  # dbus-daemon takes eavesdrop again (the last one counts)
            raise MatchRuleInvalid(f"match rule key {key!r} appears twice")
        seen.add(key)
        if key == "type":
            if value not in TYPE_CODES:
                raise MatchRuleInvalid(f"invalid message type {value!r}")
            rule.type = TYPE_CODES[value]
        elif key == "sender":
            if not names.is_bus_name(value):
                raise MatchRuleInvalid(f"invalid sender {value!r}")
            rule.sender = value
        elif key == "interface":
            if not names.is_interface_name(value):
                raise MatchRuleInvalid(f"invalid interface {value!r}")
            rule.interface = value
        elif key == "member":
            if not names.is_member_name(value):
                raise MatchRuleInvalid(f"invalid member {value!r}")
            rule.member = value
        elif key == "path":
            if not names.is_object_path(value):
                raise MatchRuleInvalid(f"invalid path {value!r}")
            rule.path = value
        elif key == "path_namespace":
            if not names.is_object_path(value):
                raise MatchRuleInvalid(f"invalid path_namespace {value!r}")
            rule.path_namespace = value
        elif key == "destination":
            if not names.is_bus_name(value):
                raise MatchRuleInvalid(f"invalid destination {value!r}")
            rule.destination = value
        elif key == "eavesdrop":
            if value not in ("true", "false"):
                raise MatchRuleInvalid(f"eavesdrop must be 'true' or 'false', not {value!r}")
            rule.eavesdrop = value == "true"
        elif key == "arg0namespace":
            if not (names.is_interface_name(value) or names.is_member_name(value)
                    or names.is_well_known_name(value)):  # fmt: skip
                raise MatchRuleInvalid(f"invalid arg0namespace {value!r}")
            rule.arg0namespace = value
        elif key.startswith("arg"):
            rest = key[3:]
            is_path = rest.endswith("path")
            digits = rest[:-4] if is_path else rest
            if not (digits.isascii() and digits.isdigit()) or len(digits) > 2 or (len(digits) > 1 and digits[0] == "0"):
                raise MatchRuleInvalid(f"unknown match rule key {key!r}")
            idx = int(digits)
            if idx > MAX_ARG:
                raise MatchRuleInvalid(f"argument index {idx} is larger than {MAX_ARG}")
            if is_path:
                rule.arg_paths[idx] = value
            else:
                rule.args[idx] = value
        else:
            raise MatchRuleInvalid(f"unknown match rule key {key!r}")
    if rule.path is not None and rule.path_namespace is not None:
        raise MatchRuleInvalid("path and path_namespace cannot both be given")
    for i in rule.args:
        if i in rule.arg_paths:
            raise MatchRuleInvalid(f"arg{i} and arg{i}path cannot both be given")
    if rule.arg0namespace is not None and (0 in rule.args or 0 in rule.arg_paths):
        raise MatchRuleInvalid("arg0namespace cannot be given with arg0 or arg0path")  # as dbus-daemon
    return rule


def rule_hits(rule: MatchRule, h, owners, sender_name: str, body) -> bool:
    """Does ``rule`` match ``h`` sent by ``sender_name``? ``owners``: name -> unique name of its owner;
    ``body.get()``: the message's arguments (unmarshalled at most once, False if malformed)."""
    if not rule.matches_header(h, owners, sender_name):
        return False
    if not rule.needs_body:
        return True
    args = body.get()
    return args is not False and rule.matches_args(args, h.signature)
