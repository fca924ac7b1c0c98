"""Monitors (broker/bus/monitors.py): who becomes one, what each sees, and that leaving is O(1)."""

import os

from broker.bus.match import parse_match_rule
from broker.bus.monitors import Monitors
from broker.bus.peer import Creds, Peer, UserAccount

from .conftest import CoreClient


def _mon(core, rules=()):
    mon = CoreClient(core, uid=os.getuid())
    mon.call("BecomeMonitor", "asu", (list(rules), 0), interface="org.freedesktop.DBus.Monitoring")
    mon.take()
    return mon


def test_monitor_rules_filter_what_each_monitor_sees(core):
    a, b = CoreClient(core), CoreClient(core)
    everything, only_j = _mon(core), _mon(core, ["interface='org.x.J'"])
    assert len(core.monitors) == 2 and everything.name not in core.peers
    everything.take()  # the second BecomeMonitor exchange
    a.signal("org.x.I", "ToB", dest=b.name)
    a.signal("org.x.J", "ToB", dest=b.name)
    assert [h.interface for h, _ in everything.take()] == ["org.x.I", "org.x.J"]
    assert [h.interface for h, _ in only_j.take()] == ["org.x.J"]


def test_a_monitor_that_leaves_is_forgotten(core):
    m1, m2 = _mon(core), _mon(core)
    core.disconnect(m1.peer)
    assert list(core.monitors) == [m2.peer] and len(core.monitoring) == 1
    a = CoreClient(core)
    assert m2.take() and not m1.peer.outbox  # the one left still sees traffic (a's Hello)
    a.call("ListNames")


def test_registry_alone():
    mons, p = Monitors(), Peer(1, Creds(0), UserAccount(0))
    mons.add(p, [parse_match_rule("member='X'")])
    assert p.monitor and len(mons) == 1
    mons.remove(p)
    mons.remove(p)
    assert len(mons) == 0


# -- as dbus-daemon (its test-monitor cases): denied messages, destination= rules ---------------------

FORBIDDING = """<busconfig><policy context="default">
  <allow user="*"/><allow own="*"/><allow send_destination="*"/><allow receive_sender="*"/>
  <allow eavesdrop="true"/>
  <deny send_interface="org.x.CannotSend"/>
  <deny receive_interface="org.x.CannotReceive"/>
  <deny receive_error="org.x.CannotReceive.Oops" receive_requested_reply="true"/>
</policy></busconfig>"""


def _forbidding(core):
    from broker.access.config import parse_config_string
    from broker.access.mediator import BusPolicy

    core.policy = BusPolicy(parse_config_string(FORBIDDING).policy)


def _seen(mon) -> list:
    return [(h.type, h.member or h.error_name, h.destination, h.reply_serial) for h, _ in mon.take()]


def test_a_denied_unicast_is_shown_before_its_error(core):
    _forbidding(core)
    a, b = CoreClient(core), CoreClient(core)
    mon = _mon(core)
    serial = a.signal("org.x.CannotSend", "Sig", dest=b.name)
    assert _seen(mon) == [(4, "Sig", b.name, 0), (3, "org.freedesktop.DBus.Error.AccessDenied", a.name, serial)]
    assert [h.error_name for h, _ in a.take()] == ["org.freedesktop.DBus.Error.AccessDenied"]
    assert not b.take()


def test_a_denied_broadcast_shows_monitors_an_access_denied_error_per_refused_receiver(core):
    _forbidding(core)
    a, b, c = CoreClient(core), CoreClient(core), CoreClient(core)
    for peer in (b, c):
        peer.call("AddMatch", "s", ("type='signal'",))
        peer.take()
    mon = _mon(core)
    b.take(), c.take()  # NameOwnerChanged: the monitor's unique name went
    serial = a.signal("org.x.CannotReceive", "Sig")
    denied = (3, "org.freedesktop.DBus.Error.AccessDenied", a.name, serial)
    assert _seen(mon) == [(4, "Sig", None, 0), denied, denied]  # the sender itself is told nothing
    assert not a.take() and not b.take() and not c.take()
    a.signal("org.x.Allowed", "Sig")  # an allowed one: no error shown
    assert _seen(mon) == [(4, "Sig", None, 0)]


def test_a_denied_requested_reply_shows_monitors_the_reply_and_an_error(core):
    from broker.wire import message as wm

    _forbidding(core)
    a, b = CoreClient(core), CoreClient(core)
    mon = _mon(core)
    serial = a.call("Do", dest=b.name, path="/", interface="org.x.I")
    b.take()
    r = b.send(wm.ERROR, destination=a.name, reply_serial=serial, error_name="org.x.CannotReceive.Oops")
    seen = _seen(mon)
    assert seen[0] == (1, "Do", b.name, 0) and seen[1] == (3, "org.x.CannotReceive.Oops", a.name, serial)
    assert seen[2] == (3, "org.freedesktop.DBus.Error.AccessDenied", b.name, r) and len(seen) == 3
    assert not a.take()


def test_a_destination_rule_names_the_receiving_connection_not_the_header_text(core):
    a, b = CoreClient(core), CoreClient(core)
    b.call("RequestName", "su", ("org.x.Recipient", 0))
    b.take()
    by_well_known, by_unique = _mon(core, ["destination='org.x.Recipient'"]), _mon(core, [f"destination='{b.name}'"])
    by_well_known.take()
    a.signal("org.x.I", "ToSelf", dest=a.name)
    a.signal("org.x.I", "ByName", dest="org.x.Recipient")
    a.signal("org.x.I", "ByUnique", dest=b.name)
    a.signal("org.x.I", "Broadcast")
    for mon in (by_well_known, by_unique):
        assert [h.member for h, _ in mon.take()] == ["ByName", "ByUnique"]


def test_a_bus_message_the_receiver_may_not_receive_shows_monitors_an_error_from_the_bus_to_itself(core):
    from broker.access.config import parse_config_string
    from broker.access.mediator import BusPolicy

    xml = FORBIDDING.replace("</policy>", '<deny receive_interface="org.freedesktop.DBus" '
                             'receive_member="NameAcquired"/></policy>')  # fmt: skip
    core.policy = BusPolicy(parse_config_string(xml).policy)
    a = CoreClient(core)
    mon = _mon(core)
    a.call("RequestName", "su", ("org.x.Name", 4))
    seen = [(h.type, h.member or h.error_name, h.destination, h.reply_serial, h.serial) for h, _ in mon.take()]
    acquired = next(i for i, m in enumerate(seen) if m[1] == "NameAcquired")
    err = seen[acquired + 1]
    assert err[:4] == (3, "org.freedesktop.DBus.Error.AccessDenied", "org.freedesktop.DBus", seen[acquired][4])
    assert [m[1] for m in seen][acquired + 2 :] == [None]  # then the RequestName reply
    assert not [h for h, _ in a.take() if h.member == "NameAcquired"]
