"""dbus-daemon policy semantics: fail-closed parsing, evaluation, `policy explain`,
and a differential test against dbus-daemon itself on the same configs."""

import os
import subprocess

import pytest

from broker.access.config import ConfigError, load_config, parse_config_string
from broker.access.policy import MsgInfo

from .conftest import SEALBUS
from .policy_diff import CLIENT_PRELUDE, DBUS_DAEMON, SEALBUS_DAEMON, compare, outcomes


class C:
    def __init__(self, uid, gids=()):
        self.uid, self.gids = uid, tuple(gids)


def cfg(policy: str, extra: str = ""):
    return parse_config_string(f"<busconfig><type>system</type>{policy}{extra}</busconfig>")


@pytest.mark.parametrize("bad", [
    '<policy context="default"><allow send_destinaton="x"/></policy>',
    '<policy context="default"><allow send_destination_prefx="x"/></policy>',
    '<policy context="sometimes"><allow own="*"/></policy>',
    '<policy context="default"><deny send_destination="a.b" send_member="X"/></policy>',
    '<policy context="default"><allow receive_member="X" receive_type="signal"/></policy>',
    '<policy context="default" user="root"><allow own="*"/></policy>',
    '<policy context="default"><allow send_interface="a.b" receive_sender="c.d"/></policy>',
    '<policy context="default"><allow own="*" user="root"/></policy>',
    '<policy context="default"><allow eavesdrop="maybe"/></policy>',
    '<policy context="default"><frobnicate/></policy>',
    '<unknown_element/>',
    '<limit name="max_bananas">3</limit>',
    '<sealbus><fds mode="some"/></sealbus>',
])  # fmt: skip
def test_fail_closed(bad):
    with pytest.raises(ConfigError) as e:
        cfg(bad)
    assert "<string>:" in str(e.value)  # file:line in every error


def test_last_match_wins_and_context_order():
    c = cfg('<policy context="default"><allow own="*"/><deny own="org.x.A"/></policy>'
            '<policy user="0"><allow own="org.x.A"/></policy>'
            '<policy context="mandatory"><deny own="org.x.B"/></policy>')  # fmt: skip
    p = c.policy
    assert not p.check_own(C(1000), "org.x.A")
    assert p.check_own(C(0), "org.x.A")  # user policy comes after default
    assert not p.check_own(C(0), "org.x.B")  # mandatory comes last
    assert p.check_own(C(1000), "org.x.C")


def test_own_prefix():
    p = cfg('<policy context="default"><allow own_prefix="org.x"/></policy>').policy
    assert p.check_own(C(1), "org.x") and p.check_own(C(1), "org.x.Y")
    assert not p.check_own(C(1), "org.xy")


def test_send_destination_matches_queued_owners_and_prefix():
    p = cfg('<policy context="default"><allow send_destination="org.x.Svc"/>'
            '<allow send_destination_prefix="org.pre"/></policy>').policy  # fmt: skip
    m = MsgInfo(1, "/", "org.x.I", "M", destination=":1.5")
    assert p.check_send(C(1), m, {":1.5", "org.x.Svc"}, False)  # name owned (or queued) by the receiver
    assert not p.check_send(C(1), m, {":1.5"}, False)
    assert p.check_send(C(1), m, {":1.5", "org.pre.Thing"}, False)
    assert not p.check_send(C(1), m, {":1.5", "org.prefix"}, False)


def test_requested_reply_semantics():
    p = cfg('<policy context="default"><allow send_destination="*"/><deny send_type="method_return"/>'
            '<allow send_type="method_return" send_requested_reply="false"/></policy>').policy  # fmt: skip
    ret = MsgInfo(2, destination=":1.1")
    assert p.check_send(C(1), ret, {":1.1"}, requested_reply=True)
    assert p.check_send(C(1), ret, {":1.1"}, requested_reply=False)
    p2 = cfg('<policy context="default"><allow send_destination="*"/></policy>').policy
    assert p2.check_send(C(1), ret, {":1.1"}, True)
    assert not p2.check_send(C(1), ret, {":1.1"}, False)  # allow rules only cover requested replies


def test_interface_less_call_hits_deny_rules():
    p = cfg('<policy context="default"><allow send_destination="*"/>'
            '<deny send_destination="org.x" send_interface="org.x.Admin"/></policy>').policy  # fmt: skip
    m = MsgInfo(1, "/", None, "Reboot", destination="org.x")
    assert not p.check_send(C(1), m, {"org.x"}, False)


def test_connect_default_is_bus_owner_only():
    p = cfg('<policy context="default"><allow own="*"/></policy>').policy
    assert p.check_connect(C(os.getuid()))
    assert not p.check_connect(C(12345))
    p2 = cfg('<policy context="default"><allow user="*"/><deny user="12345"/></policy>').policy
    assert p2.check_connect(C(777)) and not p2.check_connect(C(12345))


def test_policy_json_round_trip():
    p = load_config("/usr/share/dbus-1/system.conf").policy
    from broker.access.policy import Policy

    q = Policy.from_json(p.to_json())
    m = MsgInfo(1, "/org/freedesktop/login1", "org.freedesktop.login1.Manager", "PowerOff",
                destination="org.freedesktop.login1")  # fmt: skip
    assert bool(q.check_send(C(65534), m, {"org.freedesktop.login1"}, False)) == \
        bool(p.check_send(C(65534), m, {"org.freedesktop.login1"}, False))  # fmt: skip


def test_explain_prints_rules_in_order():
    out = subprocess.run([SEALBUS, "policy", "explain", "--config", "/usr/share/dbus-1/system.conf",
                          "--sender-uid", "65534", "--dest", "org.freedesktop.DBus", "--interface",
                          "org.freedesktop.DBus", "--member", "UpdateActivationEnvironment"],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.returncode == 3 and "DENIED" in out.stdout
    lines = [ln for ln in out.stdout.splitlines() if "system.conf:" in ln]
    assert len(lines) >= 3 and "=>" in lines[-2] and "decided by" in lines[-1]


def test_check_reports_problems(tmp_path):
    f = tmp_path / "c.conf"
    f.write_text('<busconfig><policy context="default"><allow send_interface="org.x.I"/>'
                 '<deny own="a.b"/><deny own="a.b"/></policy></busconfig>')  # fmt: skip
    out = subprocess.run([SEALBUS, "policy", "check", str(f)], capture_output=True, text=True, timeout=30)
    assert "no send_destination" in out.stdout and "shadowed" in out.stdout


# -- differential: the same config, the same scripted actions, dbus-daemon vs sealbus ----------

SCRIPT = CLIENT_PRELUDE + r"""
for name in ("org.sb.Free", "org.sb.Root", "org.sb.pre.X", "org.sb.Other"):
    out.append(f"own {name}:" + ask(message_bus.RequestName(name, 4)))
for dest, iface, member in (("org.sb.Svc", "org.sb.Public", "Get"), ("org.sb.Svc", "org.sb.Admin", "Reboot"),
                            ("org.sb.Svc", "org.sb.Public", "Secret"), ("org.freedesktop.DBus", "org.freedesktop.DBus", "ListNames"),
                            ("org.freedesktop.DBus", "org.freedesktop.DBus", "UpdateActivationEnvironment")):
    body = ({},) if member == "UpdateActivationEnvironment" else ()
    sig = "a{ss}" if body else ""
    out.append(f"send {iface}.{member}:" + ask(new_method_call(DBusAddress("/", bus_name=dest, interface=iface), member, sig, body)))
print(" ".join(out))
"""  # fmt: skip

SERVICE = r"""
import signal, sys
from jeepney import message_bus, new_method_return, MessageType
from jeepney.io.blocking import open_dbus_connection
signal.alarm(5)
c = open_dbus_connection(sys.argv[1])
c.send_and_get_reply(message_bus.RequestName("org.sb.Svc"))
signal.alarm(0)
print("ready", flush=True)
while True:
    m = c.receive()
    if m.header.message_type == MessageType.method_call:
        c.send(new_method_return(m))
"""

_DEFAULT_RECEIVE = '<allow receive_sender="*"/>'
CONFIGS = {
    "allow-all": '<policy context="default"><allow user="*"/><allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/><allow own="*"/></policy>',
    "system-like": (
        '<policy context="default"><allow user="*"/><deny own="*"/><deny send_type="method_call"/>'
        '<allow send_type="signal"/><allow send_requested_reply="true" send_type="method_return"/>'
        '<allow send_requested_reply="true" send_type="error"/><allow receive_type="method_call"/>'
        '<allow receive_type="method_return"/><allow receive_type="error"/><allow receive_type="signal"/>'
        '<allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>'
        '<deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus" send_member="UpdateActivationEnvironment"/>'
        '<allow own="org.sb.Free"/><allow own_prefix="org.sb.pre"/>'
        '<allow send_destination="org.sb.Svc" send_interface="org.sb.Public"/>'
        '<deny send_destination="org.sb.Svc" send_interface="org.sb.Public" send_member="Secret"/></policy>'
        '<policy user="root"><allow own="org.sb.Root"/><allow own="org.sb.Svc"/>'
        '<allow send_destination="org.sb.Svc"/></policy>'),
    # no receive rule at all: dbus-daemon denies even the bus driver's reply to Hello
    "no-receive-rules": (
        '<policy context="default"><allow user="*"/><allow send_destination="*"/><allow own="*"/></policy>'),
    "group-and-mandatory": (
        f'<policy context="default"><allow user="*"/><allow send_destination="*"/><allow own="*"/>{_DEFAULT_RECEIVE}</policy>'
        '<policy group="root"><deny own="org.sb.Free"/></policy>'
        '<policy context="mandatory"><deny send_interface="org.sb.Admin"/><deny own="org.sb.Other"/></policy>'),
    "deny-connect": (
        f'<policy context="default"><allow send_destination="*"/><allow own="*"/>{_DEFAULT_RECEIVE}'
        '<deny user="sealbus-test2"/><allow user="root"/><allow user="sealbus-test1"/></policy>'),
}  # fmt: skip


@pytest.mark.root
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_differential_against_dbus_daemon(name, test_users, tmp_path):
    users = [None, *test_users]
    theirs = outcomes(DBUS_DAEMON, CONFIGS[name], users, tmp_path, SCRIPT, SERVICE)
    ours = outcomes(SEALBUS_DAEMON, CONFIGS[name], users, tmp_path, SCRIPT, SERVICE)
    decisions, agree = compare(theirs, ours)
    print(f"config {name}: {agree}/{decisions} decisions agree")
    assert ours == theirs
