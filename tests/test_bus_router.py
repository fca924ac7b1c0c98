"""Routing in the sans-IO bus core: Hello first, SENDER, reply tracking,
unknown destinations, NoReply, queue limits, monitors."""

import os

from broker.wire import message as wm

from .conftest import CoreClient, summarize

E = "org.freedesktop.DBus.Error."


def test_hello_reply_comes_before_name_acquired(core):
    c = CoreClient(core, hello=False)
    c.call("Hello")
    assert summarize(c.take()) == [("return", None, (c.name,)), ("signal", "NameAcquired", (c.name,))]
    assert c.name.startswith(":1.")
    c.call("Hello")
    assert c.take()[0][0].error_name == E + "Failed"


def test_unique_names_are_never_reused(core):
    seen = set()
    for _ in range(5):
        c = CoreClient(core)
        assert c.name not in seen
        seen.add(c.name)
        core.disconnect(c.peer)


def test_first_message_not_hello_disconnects(core):
    c = CoreClient(core, hello=False)
    c.call("ListNames")
    assert c.peer.closed and c.take() == []


def test_sender_is_set_by_the_bus(core):
    a, b = CoreClient(core), CoreClient(core)
    a.send(4, path="/", interface="org.x.I", member="S", destination=b.name, sender=":1.999")
    ((h, _),) = b.take()
    assert h.sender == a.name


def test_method_reply_is_delivered_once_and_only_when_expected(core):
    caller, svc = CoreClient(core), CoreClient(core)
    serial = caller.call("Do", dest=svc.name, path="/", interface="org.x.I")
    ((call, _),) = svc.take()
    assert call.sender == caller.name and call.serial == serial
    svc.send(wm.METHOD_RETURN, reply_serial=serial, destination=caller.name, signature="s", body=("ok",))
    assert summarize(caller.take()) == [("return", None, ("ok",))]
    assert caller.peer.replies_pending == 0
    # a second reply to the same call, and a reply to a call never made, are dropped
    svc.send(wm.METHOD_RETURN, reply_serial=serial, destination=caller.name, signature="s", body=("again",))
    svc.send(wm.ERROR, reply_serial=12345, destination=caller.name, error_name="org.x.Forged")
    assert caller.take() == []
    assert core.stats["dropped_replies"] == 2


def test_reply_from_a_third_party_is_dropped(core):
    caller, svc, intruder = CoreClient(core), CoreClient(core), CoreClient(core)
    serial = caller.call("Do", dest=svc.name, path="/", interface="org.x.I")
    intruder.send(wm.METHOD_RETURN, reply_serial=serial, destination=caller.name, signature="s", body=("forged",))
    assert caller.take() == []
    svc.take()
    svc.send(wm.METHOD_RETURN, reply_serial=serial, destination=caller.name)
    assert summarize(caller.take()) == [("return", None, ())]


def test_no_reply_expected_means_no_reply_is_accepted(core):
    caller, svc = CoreClient(core), CoreClient(core)
    serial = caller.call("Do", dest=svc.name, path="/", interface="org.x.I", flags=wm.NO_REPLY_EXPECTED)
    svc.take()
    svc.send(wm.METHOD_RETURN, reply_serial=serial, destination=caller.name)
    assert caller.take() == [] and not core.pending
    caller.call("Do", dest="org.x.Nobody", path="/", interface="org.x.I", flags=wm.NO_REPLY_EXPECTED)
    assert caller.take() == []  # not even an error


def test_unknown_destinations_give_dbus_daemon_errors(core):
    c = CoreClient(core)
    c.call("Do", dest="org.x.Nobody", path="/", interface="org.x.I")
    assert c.take()[0][0].error_name == E + "ServiceUnknown"
    c.call("Do", dest="org.x.Nobody", path="/", interface="org.x.I", flags=wm.NO_AUTO_START)
    assert c.take()[0][0].error_name == E + "NameHasNoOwner"
    c.call("Do", dest=":1.999", path="/", interface="org.x.I")
    assert c.take()[0][0].error_name == E + "ServiceUnknown"
    c.call("GetNameOwner", "s", ("org.x.Nobody",))
    assert c.take()[0][0].error_name == E + "NameHasNoOwner"
    c.call("StartServiceByName", "su", ("org.x.Nobody", 0))
    assert c.take()[0][0].error_name == E + "ServiceUnknown"


def test_caller_gets_no_reply_when_the_callee_disconnects(core):
    caller, svc = CoreClient(core), CoreClient(core)
    serial = caller.call("Do", dest=svc.name, path="/", interface="org.x.I")
    core.disconnect(svc.peer)
    ((h, body),) = caller.take()
    assert h.error_name == E + "NoReply" and h.reply_serial == serial
    assert caller.peer.replies_pending == 0 and not core.pending


def test_pending_replies_limit(core):
    core.limits.max_replies_per_connection = 3
    caller, svc = CoreClient(core), CoreClient(core)
    for _ in range(3):
        caller.call("Do", dest=svc.name, path="/", interface="org.x.I")
    caller.call("Do", dest=svc.name, path="/", interface="org.x.I")
    assert caller.take()[0][0].error_name == E + "LimitsExceeded"
    assert len(svc.take()) == 3


def test_full_queue_refuses_calls_and_disconnects_a_reader_that_cannot_take_signals(core):
    core.limits.max_outgoing_bytes = 4096
    caller, stuck = CoreClient(core), CoreClient(core)
    stuck.call("AddMatch", "s", ("type='signal',interface='org.x.Flood'",))
    stuck.take()
    for _ in range(8):  # never drained: the outbox fills up
        caller.call("Do", "s", ("x" * 600,), dest=stuck.name, path="/", interface="org.x.I")
    errors = [h.error_name for h, _ in caller.take()]
    assert errors and set(errors) == {E + "LimitsExceeded"}, errors
    assert not stuck.peer.dying  # a refused call costs the caller, not the callee
    for _ in range(8):
        caller.signal("org.x.Flood", "F", "s", ("y" * 600,))
    assert stuck.peer.dying and stuck.peer.out_bytes == 0


def test_unicast_signal_reaches_its_destination_only(core):
    a, b, c = CoreClient(core), CoreClient(core), CoreClient(core)
    c.call("AddMatch", "s", ("type='signal',interface='org.x.I'",))
    c.take()
    a.signal("org.x.I", "ToB", dest=b.name)
    assert summarize(b.take()) == [("signal", "ToB", ())]
    assert c.take() == []  # not an eavesdropper
    c.call("AddMatch", "s", ("type='signal',interface='org.x.I',eavesdrop='true'",))
    c.take()
    a.signal("org.x.I", "ToB", dest=b.name)
    assert [m[0].member for m in c.take()] == ["ToB"]


def test_broadcast_goes_to_each_matching_peer_once(core):
    a, b, c = CoreClient(core), CoreClient(core), CoreClient(core)
    for rule in ("type='signal'", "interface='org.x.I'", "member='S'"):
        b.call("AddMatch", "s", (rule,))
    b.take()
    c.call("AddMatch", "s", ("member='Other'",))
    c.take()
    a.signal("org.x.I", "S")
    assert len(b.take()) == 1 and c.take() == [] and a.take() == []
    b.call("RemoveMatch", "s", ("member = 'S'",))
    assert b.take()[0][0].error_name == E + "MatchRuleInvalid"
    b.call("RemoveMatch", "s", ("member='S'",))
    b.call("RemoveMatch", "s", ("member='S'",))
    assert [h.error_name for h, _ in b.take()] == [None, E + "MatchRuleNotFound"]


def test_monitor_sees_traffic_and_may_not_send(core):
    a, b = CoreClient(core), CoreClient(core)
    a.call("BecomeMonitor", "asu", ([], 0), interface="org.freedesktop.DBus.Monitoring")
    assert a.take()[0][0].error_name == E + "AccessDenied"  # uid 1000 does not own this bus
    mon = CoreClient(core, uid=os.getuid())
    mon.call("BecomeMonitor", "asu", ([], 0), interface="org.freedesktop.DBus.Monitoring")
    assert summarize(mon.take()) == [("return", None, ()), ("signal", "NameLost", (mon.name,))]
    a.signal("org.x.I", "ToB", dest=b.name)
    assert [h.member for h, _ in mon.take()] == ["ToB"]
    mon.call("ListNames")
    assert mon.peer.dying


def test_driver_errors(core):
    c = CoreClient(core)
    c.call("NoSuchMethod")
    assert c.take()[0][0].error_name == E + "UnknownMethod"
    c.call("RequestName", "s", ("org.x.Y",))
    assert c.take()[0][0].error_name == E + "InvalidArgs"
    c.call("GetAdtAuditSessionData", "s", (c.name,))
    assert c.take()[0][0].error_name == E + "NotSupported"
    c.call("AddMatch", "s", ("type='bogus'",))
    assert c.take()[0][0].error_name == E + "MatchRuleInvalid"
    c.call("GetConnectionCredentials", "s", (c.name,))
    ((h, (creds,)),) = c.take()
    assert creds["UnixUserID"].value == 1000 and creds["ProcessID"].value == 4242
    assert list(creds["UnixGroupIDs"].value) == [1000] and "LinuxSecurityLabel" not in creds


def test_a_method_call_without_destination_is_answered_not_broadcast(core):
    """As dbus-daemon (checked side by side): UnknownMethod to the caller, even with NO_REPLY_EXPECTED,
    and a peer whose rule matches method calls does not get it."""
    a, b = CoreClient(core), CoreClient(core)
    b.call("AddMatch", "s", ("type='method_call'",))
    b.take()
    for flags in (0, wm.NO_REPLY_EXPECTED):
        serial = a.send(wm.METHOD_CALL, path="/", interface="org.x.I", member="M", flags=flags)
        ((h, body),) = a.take()
        assert (h.error_name, h.reply_serial) == (E + "UnknownMethod", serial)
        assert body == ('Method "M" with signature "" on interface "org.x.I" doesn\'t exist\n',)
    assert b.take() == []


def test_first_message_to_the_bus_not_hello_is_answered_before_the_disconnect(core):
    """As dbus-daemon: AccessDenied (the client need not wait for its timeout); the connection
    still ends, and the error is what the shell writes before closing."""
    c = CoreClient(core, hello=False)
    killed = []
    c.peer.kill = lambda reason: killed.append([h.error_name for h, _ in c.take()])
    c.call("ListNames")
    assert killed == [[E + "AccessDenied"]] and c.peer.dying
    other = CoreClient(core, hello=False)  # to anybody else: no answer, as dbus-daemon
    other.peer.kill = lambda reason: killed.append([h.error_name for h, _ in other.take()])
    other.call("Do", dest="org.x.Nobody", path="/", interface="org.x.I")
    assert killed[1:] == [[]]
