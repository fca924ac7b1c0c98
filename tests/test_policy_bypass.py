"""Ways around the bus policy that the threat model lists, each shown closed in the
real bus core with a real XML policy: name squatting, queued-owner tricks, reply
spoofing, eavesdropping, and labels that change after connect."""

import dataclasses

import pytest

from broker.access.config import parse_config_string
from broker.access.mediator import BusPolicy
from broker.access.selinux import AVDecision, SELinuxMediator

from .conftest import CoreClient

DENIED = "org.freedesktop.DBus.Error.AccessDenied"
ROOT, USER, OTHER = 0, 1000, 1001

SYSTEM_LIKE = """<busconfig><policy context="default">
  <allow user="*"/><deny own="*"/><deny send_type="method_call"/>
  <allow send_type="signal"/><allow send_requested_reply="true" send_type="method_return"/>
  <allow send_requested_reply="true" send_type="error"/>
  <allow receive_type="method_call"/><allow receive_type="method_return"/>
  <allow receive_type="error"/><allow receive_type="signal"/>
  <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
  <allow own="org.sb.Open"/><allow send_destination="org.sb.Open"/>
</policy>
<policy user="root"><allow own="org.sb.Secret"/><allow send_destination="org.sb.Secret"/></policy>
<policy context="mandatory"><deny send_destination="org.sb.Secret" send_interface="org.sb.Admin"/></policy>
</busconfig>"""


@pytest.fixture
def bus(core):
    core.policy = BusPolicy(parse_config_string(SYSTEM_LIKE).policy)
    return core


def client(core, uid, **kw):
    return CoreClient(core, uid=uid, gids=(uid,), **kw)


def errors(c):
    return [h.error_name for h, _ in c.take() if h.error_name]


def got(c):
    return [h.member for h, _ in c.take() if h.type in (1, 4)]


def test_name_squatting_is_refused_even_into_the_queue(bus):
    root, user = client(bus, ROOT), client(bus, USER)
    user.call("RequestName", "su", ("org.sb.Secret", 0))  # not even queued behind nobody
    assert errors(user) == [DENIED] and bus.registry.queued_owners("org.sb.Secret") == []
    root.call("RequestName", "su", ("org.sb.Secret", 1))  # allow replacement
    root.take()
    user.call("RequestName", "su", ("org.sb.Secret", 2))  # replace-existing: still a policy question first
    assert errors(user) == [DENIED] and bus.registry.queued_owners("org.sb.Secret") == [root.peer]


def test_a_deny_on_a_queued_name_follows_the_connection(bus):
    """send_destination matches every name the receiver owns or waits for: a service cannot be
    reached through its other names (or its unique name) when a rule on one of them denies."""
    root, svc, user = client(bus, ROOT), client(bus, ROOT), client(bus, USER)
    root.call("RequestName", "su", ("org.sb.Secret", 0))
    svc.call("RequestName", "su", ("org.sb.Open", 0))
    svc.call("RequestName", "su", ("org.sb.Secret", 0))  # queued behind root
    svc.take()
    user.call("Reboot", dest="org.sb.Open", path="/", interface="org.sb.Admin")
    assert errors(user) == [DENIED] and got(svc) == []  # mandatory deny on Secret, held (queued) by svc
    user.call("Get", dest="org.sb.Open", path="/", interface="org.sb.Public")
    assert got(svc) == ["Get"]


def test_unrequested_replies_are_dropped_and_denied(bus):
    victim, attacker = client(bus, USER), client(bus, OTHER)
    attacker.send(2, reply_serial=7, destination=victim.name)
    attacker.send(3, reply_serial=8, destination=victim.name, error_name="org.sb.Forged")
    assert victim.take() == []  # never reaches the victim, whatever the reply_serial


def test_eavesdropping_needs_policy_and_a_monitor(bus):
    root, user, spy = client(bus, ROOT), client(bus, USER), client(bus, OTHER)
    root.call("RequestName", "su", ("org.sb.Open", 0))
    root.take()
    spy.call("AddMatch", "s", ("eavesdrop=true,type='method_call'",))
    spy.take()
    user.call("Get", dest="org.sb.Open", path="/", interface="org.sb.Public")
    assert got(root) == ["Get"] and got(spy) == []  # no eavesdrop="true" rule: nothing overheard
    spy.call("BecomeMonitor", "asu", ([], 0), interface="org.freedesktop.DBus.Monitoring")
    assert errors(spy) == [DENIED]  # and a non-root, non-bus-owner may not become a monitor


class _Avc:
    def __init__(self):
        self.asked = []

    def check(self, scon, tcon, perm):
        self.asked.append((scon, tcon, perm))
        return AVDecision(True, False, True, False)


def test_the_label_is_the_one_taken_at_connect(core):
    """SO_PEERSEC is read once at accept (as dbus-daemon does); a process that changes its own
    label afterwards keeps the old one on the bus, and nothing a client sends can change it."""
    avc = _Avc()
    core.policy = BusPolicy(None, SELinuxMediator(avc, "system_u:system_r:sealbus_t:s0", {}, None))
    a = client(core, USER, label="system_u:system_r:a_t:s0")
    b = client(core, USER, label="system_u:system_r:b_t:s0")
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.peer.creds.label = "system_u:system_r:unconfined_t:s0"
    a.send(1, path="/", interface="org.sb.I", member="M", destination=b.name,
           sender=":1.1", signature="s", body=("system_u:system_r:unconfined_t:s0",))  # fmt: skip
    assert avc.asked[-1] == ("system_u:system_r:a_t:s0", "system_u:system_r:b_t:s0", "send_msg")
