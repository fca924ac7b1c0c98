"""`sealbus policy explain | check | audit`: the administrator's "why?"."""

import argparse
import grp
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


# Exit status of every `sealbus policy` subcommand (also in --help):
OK = 0  # allowed / no problem found / the audit answers match
ERROR = 1  # no answer: a config or policy that cannot be read, a tool that is missing
USAGE = 2  # a bad command line (argparse)
NO = 3  # the answer is no: denied / problems found with --strict / the audit answers differ
EXIT_CODES = """exit status (every policy subcommand): 0 allowed / no problem found / audit matches;
1 error (unreadable or invalid config or policy); 2 bad command line; 3 the answer is no (DENIED, problems
found with --strict, audit answers differ)."""
TYPE_NAMES = {code: name for name, code in TYPE_CODES.items()}
_SEND_FIELDS = (("type", "_type"), ("path", "_path"), ("interface", "_interface"), ("member", "_member"),
                ("error", "_error"))  # fmt: skip


def _account(ident: int | None, lookup) -> str:
    """A rule's user or group id as its name (``lookup``: pwd.getpwuid or grp.getgrgid); "*": any."""
    if ident is None:
        return "*"
    try:
        return lookup(ident)[0]  # pw_name / gr_name
    except KeyError:
        return str(ident)


def _message_attrs(r) -> list[tuple[str, object]]:
    pre = r.kind + "_"
    attrs = [("eavesdrop", "true")] if r.eavesdrop else []
    for field, suffix in _SEND_FIELDS:
        v = getattr(r, field)
        if v is not None:
            attrs.append((pre + suffix[1:], TYPE_NAMES.get(v, v) if field == "type" else v))
    if r.peer is not None or not attrs:  # a rule matching every message reads send_destination="*"
        attrs.append(("send_destination" if r.kind == "send" else "receive_sender", r.peer))
    if r.peer_prefix is not None:
        attrs.append(("send_destination_prefix", r.peer_prefix))
    if r.broadcast is not None:
        attrs.append(("send_broadcast", "true" if r.broadcast else "false"))
    if r.requested_reply != r.allow:  # the default: allow rules match requested replies, deny rules unrequested
        attrs.append((pre + "requested_reply", "true" if r.requested_reply else "false"))
    attrs += [(k, getattr(r, k)) for k in ("min_fds", "max_fds") if getattr(r, k) is not None]
    return attrs


def describe_rule(r) -> str:
    """A compiled rule in the config's own words: send_type="method_call", user="*", ..."""
    if r.kind in ("send", "receive"):
        attrs = _message_attrs(r)
    elif r.kind == "own":
        attrs = [("own_prefix", r.own_prefix)] if r.own_prefix is not None else [("own", r.own)]
    elif r.kind == "user":
        attrs = [("user", _account(r.uid, pwd.getpwuid))]
    elif r.kind == "group":
        attrs = [("group", _account(r.gid, grp.getgrgid))]
    else:
        attrs = []
    shown = " ".join(f'{k}="{"*" if v is None else v}"' for k, v in attrs)
    return f"<{'allow' if r.allow else 'deny'} {shown}/> ({r.where})"


def _print_decision(what: str, d: Decision) -> None:
    print(f"{what}: {'ALLOWED' if d.allowed else 'DENIED'}")
    if not d.matched:
        print("  no rule matched: the default applies")
    for r in d.matched:
        mark = "=> " if r is d.rule else "   "
        print(f"  {mark}{describe_rule(r)}")
    if d.rule is not None:
        print(f"  decided by {d.rule.where} (the last matching rule wins)")


def cmd_explain(a) -> int:
    cfg = load_config(a.config)
    pol = cfg.policy
    sender = creds_for(a.sender_uid)
    if a.own:
        d = pol.check_own(sender, a.own)
        _print_decision(f"uid {a.sender_uid} owning {a.own}", d)
        return OK if d.allowed else NO
    if a.connect:
        d = pol.check_connect(sender)
        _print_decision(f"uid {a.sender_uid} connecting", d)
        return OK if d.allowed else NO
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
    return OK if ok else NO


def cmd_check(a) -> int:
    p = _Parser(_selinux_enabled())
    p.parse_file(a.config)  # a ConfigError is reported by main()
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
    return NO if problems and a.strict else OK


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="sealbus policy", description="Explain, check and audit sealbus policy. "
                                "explain and check read a dbus-daemon XML config given with --config; audit "
                                "reads a binary SELinux policy (--policy, default: built from policy/).",
                                epilog=EXIT_CODES)  # fmt: skip
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("explain", help="why is this message / name / connection allowed or denied?",
                       epilog=EXIT_CODES)  # fmt: skip
    e.add_argument(
        "--config", required=True, metavar="FILE", help="the bus config (e.g. /usr/share/dbus-1/system.conf)"
    )
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
    c = sub.add_parser("check", help="validate a config tree; warn about risky or shadowed rules", epilog=EXIT_CODES)
    c.add_argument("--config", metavar="FILE", help="the bus config (e.g. /usr/share/dbus-1/system.conf)")
    c.add_argument("old_config", nargs="?", help=argparse.SUPPRESS)  # `policy check FILE`, as before --config
    c.add_argument("--strict", action="store_true", help="exit 3 when there are warnings")
    sub.add_parser("audit", help="audit the SELinux policy (setools)", add_help=False)
    a, rest = p.parse_known_args(argv)
    if a.cmd == "audit":
        return _audit(rest)
    if rest:
        p.error(f"unrecognised arguments: {' '.join(rest)}")
    if a.cmd == "check":
        if a.config and a.old_config:
            c.error("give the config once, with --config FILE")
        a.config = a.config or a.old_config
        if not a.config:
            c.error("the following arguments are required: --config")
    try:
        return cmd_explain(a) if a.cmd == "explain" else cmd_check(a)
    except ConfigError as e:
        print(f"sealbus policy {a.cmd}: {e}", file=sys.stderr)
        return ERROR


def _audit(argv: list[str]) -> int:
    """selinux_audit's own codes (1 differs, 2 error) in the policy commands' convention."""
    from .selinux_audit import main as audit_main

    try:
        rc = audit_main(argv)
    except SystemExit as e:
        if e.code == 0 and {"-h", "--help"} & set(argv):  # its own help speaks of its own codes
            print(f"\nrun as `sealbus policy audit`: {EXIT_CODES}")
        raise
    return {0: OK, 1: NO, 2: ERROR}.get(rc, rc)
