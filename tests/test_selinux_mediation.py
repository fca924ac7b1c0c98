"""SELinux mediation (dbus { send_msg acquire_svc }) in the bus core.

The kernel's answer is faked only at the boundary (the decision function
``check(scon, tcon, perm)``); everything above it -- which label is asked
about for which message, what the client sees, the USER_AVC text, the
launcher's record filter, and the real netlink audit write -- is the real code.
The same questions against a real enforcing kernel run in the VM tier.
"""

import subprocess

import pytest

from broker.access.audit import AuditWriter, user_avc_message
from broker.access.mediator import BusPolicy
from broker.access.selinux import USER_AVC_FORM, AuditLimiter, AVDecision, SELinuxMediator, make_mediator

from .conftest import CoreClient

BUS = "system_u:system_r:sealbus_t:s0"
CLIENT = "system_u:system_r:client_t:s0"
SERVICE = "system_u:system_r:service_t:s0"
SPY = "system_u:system_r:spy_t:s0"
NAME_T = "system_u:object_r:service_name_t:s0"
DENIED = "org.freedesktop.DBus.Error.AccessDenied"


class FakeAVC:
    """A policy as a set of (source, target, perm) grants; records every question."""

    def __init__(self, grants, permissive=False, dontaudit=()):
        self.grants, self.permissive, self.dontaudit = set(grants), permissive, set(dontaudit)
        self.asked = []

    def check(self, scon, tcon, perm):
        self.asked.append((scon, tcon, perm))
        denied = (scon, tcon, perm) not in self.grants
        return AVDecision(not denied or self.permissive, denied, (scon, tcon, perm) not in self.dontaudit,
                          denied and self.permissive)  # fmt: skip


GRANTS = {
    (CLIENT, BUS, "send_msg"), (SERVICE, BUS, "send_msg"), (SPY, BUS, "send_msg"),
    (CLIENT, SERVICE, "send_msg"), (SERVICE, CLIENT, "send_msg"), (SERVICE, SPY, "send_msg"),
    (SERVICE, NAME_T, "acquire_svc"), (CLIENT, BUS, "acquire_svc"),
}  # fmt: skip


@pytest.fixture
def mediated(core):
    avc, records = FakeAVC(GRANTS), []
    core.policy = BusPolicy(None, SELinuxMediator(avc, BUS, {"org.sb.Service": NAME_T}, records.append))
    return core, avc, records


def errors(client):
    return [(h.error_name, body[0] if body else "") for h, body in client.take() if h.error_name]


def returns(client):
    return [body for h, body in client.take() if h.type == 2]


def test_calls_to_the_driver_are_sends_to_the_bus_label(mediated):
    core, avc, _ = mediated
    client = CoreClient(core, label=CLIENT)
    assert avc.asked == []  # Hello is exempt, as in dbus-daemon (a connection without a name may only say Hello)
    client.call("ListNames")
    assert (CLIENT, BUS, "send_msg") in avc.asked and len(returns(client)) == 1
    nobody = CoreClient(core, label="system_u:system_r:nobody_t:s0")
    nobody.call("ListNames")
    ((name, text),) = errors(nobody)
    assert name == DENIED and f"tcontext={BUS}" in text


def test_acquire_svc_uses_the_association_or_the_bus_label(mediated):
    core, avc, records = mediated
    svc, client = CoreClient(core, label=SERVICE, pid=11), CoreClient(core, label=CLIENT, pid=22)
    svc.call("RequestName", "su", ("org.sb.Service", 4))
    assert returns(svc) == [(1,)]
    client.call("RequestName", "su", ("org.sb.Service", 4))
    ((name, text),) = errors(client)
    assert name == DENIED and f"scontext={CLIENT}" in text and f"tcontext={NAME_T}" in text
    assert (CLIENT, NAME_T, "acquire_svc") in avc.asked
    client.call("RequestName", "su", ("org.sb.Unassociated", 4))  # no association: the bus's own label
    assert returns(client) == [(1,)] and (CLIENT, BUS, "acquire_svc") in avc.asked
    (rec,) = records
    assert USER_AVC_FORM.fullmatch(rec)
    assert "{ acquire_svc }" in rec and "service=org.sb.Service spid=22" in rec and f"tcontext={NAME_T}" in rec


def test_send_msg_between_peers_and_the_denial_record(mediated):
    core, avc, records = mediated
    svc, client, spy = CoreClient(core, label=SERVICE, pid=11), CoreClient(core, label=CLIENT, pid=22), \
        CoreClient(core, label=SPY, pid=33)  # fmt: skip
    client.call("Get", dest=svc.name, path="/o", interface="org.sb.I")
    assert [h.member for h, _ in svc.take()] == ["Get"]
    spy.call("Get", dest=svc.name, path="/o", interface="org.sb.I")
    assert svc.take() == []
    ((name, text),) = errors(spy)
    assert name == DENIED and f"scontext={SPY}" in text and f"tcontext={SERVICE}" in text
    (rec,) = records
    assert USER_AVC_FORM.fullmatch(rec)
    for part in (
        "{ send_msg }",
        "msgtype=method_call",
        "interface=org.sb.I",
        "member=Get",
        f"dest={svc.name}",
        "spid=33",
        "tpid=11",
        f"scontext={SPY}",
        f"tcontext={SERVICE}",
        "permissive=0",
    ):
        assert part in rec, part


def test_each_broadcast_recipient_is_checked(mediated):
    core, avc, _ = mediated
    svc, client, spy = CoreClient(core, label=SERVICE), CoreClient(core, label=CLIENT), CoreClient(core, label=SPY)
    for c in (client, spy):
        c.call("AddMatch", "s", ("type='signal',interface='org.sb.I'",))
        c.take()
    svc.send(4, path="/o", interface="org.sb.I", member="Changed")
    assert [h.member for h, _ in client.take()] == ["Changed"] and [h.member for h, _ in spy.take()] == ["Changed"]
    avc.asked.clear()
    client.send(4, path="/o", interface="org.sb.I", member="Changed")  # client -> spy is not granted
    assert spy.take() == [] and (CLIENT, SPY, "send_msg") in avc.asked


def test_permissive_allows_but_records(core):
    avc, records = FakeAVC(GRANTS, permissive=True), []
    core.policy = BusPolicy(None, SELinuxMediator(avc, BUS, {}, records.append))
    svc, spy = CoreClient(core, label=SERVICE), CoreClient(core, label=SPY)
    spy.call("Get", dest=svc.name, path="/o", interface="org.sb.I")
    assert [h.member for h, _ in svc.take()] == ["Get"]
    assert len(records) == 1 and records[0].endswith("permissive=1")


def test_dontaudit_denies_without_a_record(core):
    avc, records = FakeAVC(GRANTS, dontaudit={(SPY, SERVICE, "send_msg")}), []
    core.policy = BusPolicy(None, SELinuxMediator(avc, BUS, {}, records.append))
    svc, spy = CoreClient(core, label=SERVICE), CoreClient(core, label=SPY)
    spy.call("Get", dest=svc.name, path="/o", interface="org.sb.I")
    assert errors(spy)[0][0] == DENIED and records == []


def test_xml_policy_and_selinux_both_apply(core):
    from broker.access.config import parse_config_string

    xml = parse_config_string('<busconfig><policy context="default"><allow send_destination="*"/>'
                              '<allow receive_sender="*"/><allow own="*"/><allow user="*"/>'
                              '<deny send_interface="org.sb.Xml"/></policy></busconfig>').policy  # fmt: skip
    avc = FakeAVC(GRANTS)
    core.policy = BusPolicy(xml, SELinuxMediator(avc, BUS, {}, None))
    svc, client, spy = CoreClient(core, label=SERVICE), CoreClient(core, label=CLIENT), CoreClient(core, label=SPY)
    client.call("Get", dest=svc.name, path="/o", interface="org.sb.Xml")
    assert errors(client)[0][0] == DENIED  # XML denies, SELinux would allow
    spy.call("Get", dest=svc.name, path="/o", interface="org.sb.I")
    assert errors(spy)[0][0] == DENIED  # XML allows, SELinux denies
    client.call("Get", dest=svc.name, path="/o", interface="org.sb.I")
    assert [h.member for h, _ in svc.take()] == ["Get"]


def test_audit_limiter_bounds_a_flood():
    lim = AuditLimiter(rate=0.0001, burst=5)
    assert [lim.take() for _ in range(8)] == [True] * 5 + [False] * 3 and lim.suppressed == 3


def test_launcher_writes_only_well_formed_dbus_records():
    assert USER_AVC_FORM.fullmatch("avc:  denied  { send_msg } for msgtype=signal spid=1 tpid=2 scontext=a "
                                   "tcontext=b tclass=dbus permissive=0")  # fmt: skip
    for forged in ("type=USER_LOGIN msg=audit(1:1): op=login acct=root res=success",
                   "avc:  granted  { send_msg } for x tclass=dbus permissive=0",
                   "avc:  denied  { send_msg } for x\ntype=USER_LOGIN tclass=dbus permissive=0",
                   "avc:  denied  { read } for x tclass=file permissive=0"):  # fmt: skip
        assert not USER_AVC_FORM.fullmatch(forged)


def test_disabled_selinux_means_no_mediator_at_all():
    import selinux

    if selinux.is_selinux_enabled() == 1:
        pytest.skip("this host has SELinux enabled: covered by the VM tier")
    assert make_mediator({"a.b": NAME_T}, None) is None


@pytest.mark.root  # CAP_AUDIT_WRITE
def test_user_avc_reaches_the_kernel_audit_log():
    """The launcher's real writer: a USER_AVC record through NETLINK_AUDIT, found in the kernel log."""
    msg = user_avc_message("avc:  denied  { send_msg } for x tclass=dbus permissive=0", 7)
    assert int.from_bytes(msg[4:6], "little") == 1107 and msg.endswith(b"\0")
    import secrets

    marker = f"sealbus-test-{secrets.token_hex(6)}"
    w = AuditWriter()
    w(f"avc:  denied  {{ send_msg }} for member={marker} scontext=a tcontext=b tclass=dbus permissive=0")
    assert not w.broken, "the audit netlink socket refused the record (no CAP_AUDIT_WRITE or no audit?)"
    logs = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    try:
        logs += open("/var/log/audit/audit.log").read()
    except OSError:
        pass
    assert marker in logs and "1107" in logs.split(marker)[0].rsplit("\n", 1)[-1]
