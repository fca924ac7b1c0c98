"""`sealbus policy explain | check | audit`: the administrator's "why?"."""

import argparse
import os
import pwd
import sys

from .config import ConfigError, _Parser, _selinux_enabled, load_config
from .policy import TYPE_CODES, Decision, MsgInfo


class _Creds:
    def __init__(self, uid: int, gids: tuple[int, ...]):
        self.uid, self.gids = uid, gids


def creds_for(uid: int) -> _Creds:
    try:
        name = pwd.getpwuid(uid).pw_name
        gids = tuple(os.getgrouplist(name, pwd.getpwuid(uid).pw_gid))
    except KeyError:
        gids = ()
    return _Creds(uid, gids)


def _print_decision(what: str, d: Decision) -> None:
    print(f"{what}: {'ALLOWED' if d.allowed else 'DENIED'}")
    if not d.matched:
        print("  no rule matched: the default applies")
    for r in d.matched:
        mark = "=> " if r is d.rule else "   "
        print(f"  {mark}{r.describe()}")
    if d.rule is not None:
        print(f"  decided by {d.rule.where} (the last matching rule wins)")


def cmd_explain(a) -> int:
    cfg = load_config(a.config)
    pol = cfg.policy
    sender = creds_for(a.sender_uid)
    if a.own:
        _print_decision(f"uid {a.sender_uid} owning {a.own}", pol.check_own(sender, a.own))
        return 0
    if a.connect:
        _print_decision(f"uid {a.sender_uid} connecting", pol.check_connect(sender))
        return 0
    msg = MsgInfo(TYPE_CODES[a.type], a.path, a.interface, a.member, a.error, a.dest, a.sender_name)
    names = None if a.dest == "org.freedesktop.DBus" else {a.dest, *(a.dest_also or [])}
    ok = True
    d = pol.check_send(sender, msg, names, a.requested_reply)
    _print_decision(f"send from uid {a.sender_uid} to {a.dest}", d)
    ok &= d.allowed
    if a.dest_uid is not None:
        sender_names = {a.sender_name} if a.sender_name else set()
        d = pol.check_receive(creds_for(a.dest_uid), msg, sender_names, a.requested_reply)
        _print_decision(f"receive by uid {a.dest_uid}", d)
        ok &= d.allowed
    return 0 if ok else 3


def cmd_check(a) -> int:
    p = _Parser(_selinux_enabled())
    try:
        p.parse_file(a.config)
    except ConfigError as e:
        print(f"error: {e}")
        return 1
    problems = 0
    for sec in p.cfg.policies:
        seen: dict[tuple, object] = {}
        for r in sec.rules:
            keys = set(r.attrs)
            if keys & {"send_interface", "send_member"} and not keys & {"send_destination", "send_destination_prefix"}:
                if r.allow:
                    print(f"warning: {r.where}: allow with send_interface/send_member but no send_destination "
                          "applies to every service on the bus")  # fmt: skip
                    problems += 1
            sig = (r.kind, tuple(sorted((k, v) for k, v in r.attrs.items() if k != "log")))
            if sig in seen:
                print(f"warning: {seen[sig].where}: shadowed by {r.where} (same match, later rule wins)")
                problems += 1
            seen[sig] = r
    print(f"{len(p.cfg.files)} file(s), {sum(len(s.rules) for s in p.cfg.policies)} rules, {problems} problem(s)")
    return 0 if problems == 0 or not a.strict else 2


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="sealbus policy", description="Explain, check and audit sealbus policy.")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("explain", help="why is this message / name / connection allowed or denied?")
    e.add_argument("--config", required=True)
    e.add_argument("--sender-uid", type=int, required=True)
    e.add_argument("--sender-name", help="a name the sender owns (for receive_sender rules)")
    e.add_argument("--dest", default="org.freedesktop.DBus", help="destination bus name")
    e.add_argument("--dest-also", action="append", help="other names the destination owns (queued too)")
    e.add_argument("--dest-uid", type=int, help="also check the receive rules of this uid")
    e.add_argument("--type", default="method_call", choices=sorted(TYPE_CODES))
    e.add_argument("--path")
    e.add_argument("--interface")
    e.add_argument("--member")
    e.add_argument("--error")
    e.add_argument("--requested-reply", action="store_true")
    e.add_argument("--own", metavar="NAME", help="explain RequestName(NAME) instead")
    e.add_argument("--connect", action="store_true", help="explain whether the uid may connect")
    c = sub.add_parser("check", help="validate a config tree; warn about risky or shadowed rules")
    c.add_argument("config")
    c.add_argument("--strict", action="store_true", help="exit non-zero on warnings too")
    sub.add_parser("audit", help="audit the SELinux policy (setools)", add_help=False)
    a, rest = p.parse_known_args(argv)
    if a.cmd == "audit":
        from .selinux_audit import main as audit_main

        return audit_main(rest)
    if rest:
        p.error(f"unrecognised arguments: {' '.join(rest)}")
    try:
        return cmd_explain(a) if a.cmd == "explain" else cmd_check(a)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
