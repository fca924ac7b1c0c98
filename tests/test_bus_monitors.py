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
