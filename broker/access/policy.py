"""dbus-daemon policy semantics, compiled for fast decisions.

API (used by the bus through :mod:`broker.access.mediator`, and by
``sealbus policy explain``)::

    policy = compile_policy(sections, resolve_names=True)
    policy.check_connect(creds) -> Decision
    policy.check_own(creds, name) -> Decision
    policy.check_send(sender, msg, receiver_names, requested_reply, eavesdrop=False) -> Decision
    policy.check_receive(receiver, msg, sender_names, requested_reply, eavesdrop=False) -> Decision
    Policy.from_json(policy.to_json())

``creds`` has ``uid`` and ``gids``; ``msg`` is a :class:`MsgInfo`;
``*_names`` are the unique and well-known names (primary and queued) the
other side owns, or ``None`` when the other side is the bus driver. A
:class:`Decision` carries the winning rule and every rule that matched, in
order, for logs and for ``explain``.

Semantics (dbus-daemon's): sections apply in the order default, group,
user, at_console, mandatory; within them rules apply in file order; the last
matching rule wins; nothing matching means deny (send, receive, own) or
"only the bus owner's uid" (connect, which looks only at default and
mandatory sections). ``requested_reply`` and ``eavesdrop`` restrict which
allow/deny rules apply, as the dbus-daemon manual describes.
"""

import grp
import json
import os
import pwd
from dataclasses import dataclass, field

DRIVER = "org.freedesktop.DBus"
TYPE_CODES = {"method_call": 1, "method_return": 2, "error": 3, "signal": 4}


@dataclass
class MsgInfo:
    type: int
    path: str | None = None
    interface: str | None = None
    member: str | None = None
    error_name: str | None = None
    destination: str | None = None
    sender: str | None = None
    n_fds: int = 0

    @property
    def broadcast(self) -> bool:
        return self.destination is None and self.type == 4


@dataclass
class CRule:
    """A compiled rule: ``None`` means "any" for every field."""

    allow: bool
    kind: str  # send | receive | own | user | group
    where: str
    type: int | None = None
    path: str | None = None
    interface: str | None = None
    member: str | None = None
    error: str | None = None
    peer: str | None = None  # send_destination / receive_sender
    peer_prefix: str | None = None
    broadcast: bool | None = None
    requested_reply: bool = True
    eavesdrop: bool = False
    min_fds: int | None = None
    max_fds: int | None = None
    own: str | None = None
    own_prefix: str | None = None
    uid: int | None = None  # for user rules; None = "*"
    gid: int | None = None
    log: bool = False

    def describe(self) -> str:
        skip = ("allow", "kind", "where", "requested_reply", "eavesdrop", "log")
        parts = [f"{k}={v!r}" for k, v in self.__dict__.items() if k not in skip and v is not None]
        return f"{'allow' if self.allow else 'deny'} {self.kind} {' '.join(parts)} ({self.where})"


@dataclass
class Decision:
    allowed: bool
    rule: CRule | None = None
    matched: list = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.allowed


def _any(v):
    return None if v in (None, "*") else v


def _compile_rule(r, resolve_names: bool) -> CRule | None:
    a = r.attrs
    kind = r.kind
    allow = r.allow
    if kind == "eavesdrop":  # <allow eavesdrop="true"/> alone is a receive-everything rule
        kind = "receive"
    c = CRule(allow=allow, kind=kind, where=r.where, log=a.get("log") == "true")
    if kind in ("send", "receive"):
        pre = kind + "_"
        t = _any(a.get(pre + "type"))
        c.type = TYPE_CODES[t] if t else None
        c.path = _any(a.get(pre + "path"))
        c.interface = _any(a.get(pre + "interface"))
        c.member = _any(a.get(pre + "member"))
        c.error = _any(a.get(pre + "error"))
        c.peer = _any(a.get("send_destination" if kind == "send" else "receive_sender"))
        c.peer_prefix = a.get("send_destination_prefix") if kind == "send" else None
        if kind == "send" and "send_broadcast" in a:
            c.broadcast = a["send_broadcast"] == "true"
        rr = a.get(pre + "requested_reply")
        # default: allow rules only match requested replies, deny rules only unrequested ones
        c.requested_reply = (rr == "true") if rr is not None else allow
        c.eavesdrop = a.get("eavesdrop") == "true"
        c.min_fds = int(a["min_fds"]) if "min_fds" in a else None
        c.max_fds = int(a["max_fds"]) if "max_fds" in a else None
    elif kind == "own":
        c.own = a.get("own")
        c.own_prefix = a.get("own_prefix")
    elif kind == "user":
        u = a["user"]
        if u != "*":
            c.uid = _uid(u, resolve_names)
            if c.uid is None:
                return None  # unknown user: dbus-daemon ignores the rule
    elif kind == "group":
        g = a["group"]
        if g != "*":
            c.gid = _gid(g, resolve_names)
            if c.gid is None:
                return None
    return c


def _uid(name: str, resolve: bool) -> int | None:
    if name.isdigit():
        return int(name)
    if not resolve:
        return None
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def _gid(name: str, resolve: bool) -> int | None:
    if name.isdigit():
        return int(name)
    if not resolve:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


@dataclass
class Section:
    context: str | None
    uid: int | None = None
    gid: int | None = None
    at_console: bool | None = None
    rules: list[CRule] = field(default_factory=list)


def compile_policy(sections, *, resolve_names: bool = True, owner_uid: int | None = None) -> "Policy":
    out = []
    for sec in sections:
        s = Section(sec.context, at_console=sec.at_console)
        # as dbus-daemon: "*" is no wildcard for a <policy user/group=...> section (only for <allow user="*"/>
        # rules); it is an unknown user or group, and a section for one is ignored
        if sec.user is not None:
            s.uid = _uid(sec.user, resolve_names)
            if s.uid is None:
                continue
        if sec.group is not None:
            s.gid = _gid(sec.group, resolve_names)
            if s.gid is None:
                continue
        for r in sec.rules:
            c = _compile_rule(r, resolve_names)
            if c is not None:
                s.rules.append(c)
        out.append(s)
    return Policy(out, os.getuid() if owner_uid is None else owner_uid)


class Policy:
    def __init__(self, sections: list[Section], owner_uid: int):
        self.sections = sections
        self.owner_uid = owner_uid
        self._cache: dict[tuple, list[CRule]] = {}
        self.allows_all_messages = self._trivially_allows_messages()

    # -- which rules apply to a connection ------------------------------------

    def rules_for(self, uid: int, gids) -> list[CRule]:
        key = (uid, tuple(gids))
        rules = self._cache.get(key)
        if rules is not None:
            return rules
        order = {"default": [], "group": [], "user": [], "console": [], "mandatory": []}
        for s in self.sections:
            if s.context == "default":
                order["default"].append(s)
            elif s.context == "mandatory":
                order["mandatory"].append(s)
            elif s.gid is not None and s.gid in gids:
                order["group"].append(s)
            elif s.uid is not None and s.uid == uid:
                order["user"].append(s)
            elif s.at_console is False:  # nobody is "at console" for sealbus
                order["console"].append(s)
        rules = [r for k in order for s in order[k] for r in s.rules]
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[key] = rules
        return rules

    def _trivially_allows_messages(self) -> bool:
        """True when every send and receive is allowed whatever it is (e.g. session.conf)."""
        send_all = recv_all = False
        for s in self.sections:
            if s.context not in ("default", "mandatory", None) and s.rules:
                if any(r.kind in ("send", "receive") for r in s.rules):
                    return False
            for r in s.rules:
                if r.kind not in ("send", "receive"):
                    continue
                unconditional = all(getattr(r, f) is None for f in (
                    "type", "path", "interface", "member", "error", "peer", "peer_prefix", "broadcast",
                    "min_fds", "max_fds"))  # fmt: skip
                if not r.allow:
                    return False
                if unconditional and r.kind == "send":
                    send_all = True
                if unconditional and r.kind == "receive":
                    recv_all = True
        return send_all and recv_all

    # -- decisions ---------------------------------------------------------------

    def check_connect(self, creds) -> Decision:
        d = Decision(creds.uid == self.owner_uid)
        for ctx in ("default", "mandatory"):
            for s in self.sections:
                if s.context != ctx:
                    continue
                for r in s.rules:
                    if r.kind == "user" and (r.uid is None or r.uid == creds.uid):
                        d.allowed, d.rule = r.allow, r
                        d.matched.append(r)
                    elif r.kind == "group" and (r.gid is None or r.gid in creds.gids):
                        d.allowed, d.rule = r.allow, r
                        d.matched.append(r)
        return d

    def check_own(self, creds, name: str) -> Decision:
        d = Decision(False)
        for r in self.rules_for(creds.uid, creds.gids):
            if r.kind != "own":
                continue
            if r.own is not None:
                if r.own != "*" and r.own != name:
                    continue
            elif r.own_prefix is not None:
                if not (name == r.own_prefix or name.startswith(r.own_prefix + ".")):
                    continue
            d.allowed, d.rule = r.allow, r
            d.matched.append(r)
        return d

    def check_send(self, sender, msg: MsgInfo, receiver_names, requested_reply: bool,
                   eavesdrop: bool = False) -> Decision:  # fmt: skip
        return self._check("send", self.rules_for(sender.uid, sender.gids), msg, receiver_names,
                           requested_reply, eavesdrop)  # fmt: skip

    def check_receive(self, receiver, msg: MsgInfo, sender_names, requested_reply: bool,
                      eavesdrop: bool = False) -> Decision:  # fmt: skip
        return self._check("receive", self.rules_for(receiver.uid, receiver.gids), msg, sender_names,
                           requested_reply, eavesdrop)  # fmt: skip

    def _check(self, kind, rules, msg: MsgInfo, other_names, requested_reply, eavesdrop) -> Decision:  # noqa: C901
        d = Decision(False)
        is_reply = msg.type in (2, 3)
        for r in rules:
            if r.kind != kind:
                continue
            if r.type is not None and r.type != msg.type:
                continue
            if is_reply:
                if r.allow and r.requested_reply and not requested_reply:
                    continue
                if not r.allow and not r.requested_reply and requested_reply:
                    continue
            if eavesdrop:
                if r.allow and not r.eavesdrop:
                    continue
            elif not r.allow and r.eavesdrop:
                continue
            if r.path is not None and r.path != msg.path:
                continue
            if r.interface is not None:
                # a message without an interface matches deny rules (no bypass) but not allow rules
                if msg.interface is None:
                    if r.allow:
                        continue
                elif r.interface != msg.interface:
                    continue
            if r.member is not None and r.member != msg.member:
                continue
            if r.error is not None and r.error != msg.error_name:
                continue
            if r.peer is not None:
                if other_names is None:
                    if r.peer != DRIVER:
                        continue
                elif r.peer not in other_names:
                    continue
            if r.peer_prefix is not None:
                p = r.peer_prefix
                names = (DRIVER,) if other_names is None else other_names
                if not any(n == p or n.startswith(p + ".") for n in names):
                    continue
            if r.broadcast is not None and r.broadcast != msg.broadcast:
                continue
            if r.min_fds is not None and msg.n_fds < r.min_fds:
                continue
            if r.max_fds is not None and msg.n_fds > r.max_fds:
                continue
            d.allowed, d.rule = r.allow, r
            d.matched.append(r)
        return d

    # -- serialisation (launcher -> broker) --------------------------------------

    def to_json(self) -> str:
        return json.dumps({"owner_uid": self.owner_uid, "sections": [
            {"context": s.context, "uid": s.uid, "gid": s.gid, "at_console": s.at_console,
             "rules": [r.__dict__ for r in s.rules]} for s in self.sections]})  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> "Policy":
        data = json.loads(text)
        sections = [Section(s["context"], s["uid"], s["gid"], s["at_console"], [CRule(**r) for r in s["rules"]])
                    for s in data["sections"]]  # fmt: skip
        return cls(sections, data["owner_uid"])
