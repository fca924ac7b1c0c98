"""Reply tracking (broker/bus/replies.py): slots freed from either end in time
proportional to that end's own slots, no leak when a caller leaves first,
and reply_timeout enforced by the bus (NoReply)."""

import math

import trio
import trio.testing

from broker.bus.peer import Creds, Peer, UserAccount
from broker.bus.replies import ReplyRegistry
from broker.wire import message as wm

from .conftest import CoreClient
from .worktrace import needs_python_lines, work

E = "org.freedesktop.DBus.Error."


def _peer(i):
    return Peer(i, Creds(1000), UserAccount(1000))


# -- the registry alone ------------------------------------------------------------------------


def test_slot_is_in_both_ends_and_freed_by_a_reply():
    reg, a, b = ReplyRegistry(), _peer(1), _peer(2)
    slot = reg.add(a, 7, b)
    assert a.calls == {7: slot} and b.owed == {slot: None} and len(reg) == 1 and a.replies_pending == 1
    assert not reg.take(a, 7, _peer(3))  # only the callee may answer
    assert reg.take(a, 7, b)
    assert not reg.take(a, 7, b)  # once
    assert a.calls == {} and b.owed == {} and len(reg) == 0 and a.replies_pending == 0


def test_reused_serial_replaces_the_pending_call():
    reg, a, b, c = ReplyRegistry(), _peer(1), _peer(2), _peer(3)
    reg.add(a, 7, b)
    reg.add(a, 7, c)
    assert len(reg) == 1 and b.owed == {} and len(c.owed) == 1 and a.replies_pending == 1
    assert not reg.take(a, 7, b) and reg.take(a, 7, c)


def test_either_end_frees_only_its_own_slots():
    reg = ReplyRegistry()
    a, b, svc, other = _peer(1), _peer(2), _peer(3), _peer(4)
    for s in range(5):
        reg.add(a, s, svc)
        reg.add(b, s, svc)
        reg.add(b, 100 + s, other)
    assert reg.drop_caller(a) == 5
    assert len(svc.owed) == 5 and len(reg) == 10
    gone = reg.drop_replier(svc)
    assert [(s.caller, s.serial) for s in gone] == [(b, s) for s in range(5)]
    assert len(reg) == 5 and b.replies_pending == 5 and len(other.owed) == 5


def test_timeouts_are_stamped_by_the_shells_clock_and_expire_in_order():
    reg, a, b = ReplyRegistry(), _peer(1), _peer(2)
    armed = []
    reg.on_armed = lambda: armed.append(1)
    assert reg.next_deadline() is None
    reg.add(a, 1, b, 1000)
    reg.add(a, 2, b, 1000)
    reg.add(a, 3, b, 0)  # never times out
    assert armed == [1]  # once per batch of fresh slots
    assert reg.next_deadline() == -math.inf
    assert reg.expire(10.0) == [] and reg.next_deadline() == 11.0
    reg.add(a, 4, b, 500)
    assert armed == [1, 1]
    assert reg.expire(10.5) == [] and reg.next_deadline() == 11.0
    assert [s.serial for s in reg.expire(10.999)] == []
    assert [s.serial for s in reg.expire(11.0)] == [1, 2, 4]
    assert len(reg) == 1 and reg.next_deadline() is None and a.calls.keys() == {3}


def test_an_answered_timed_slot_leaves_the_timer():
    reg, a, b = ReplyRegistry(), _peer(1), _peer(2)
    reg.add(a, 1, b, 1000)
    assert reg.take(a, 1, b) and reg.next_deadline() is None
    reg.add(a, 2, b, 1000)
    reg.expire(0.0)
    assert reg.take(a, 2, b) and reg.next_deadline() is None and reg.timed == {}


def test_timed_slots_freed_from_either_end_leave_the_timer_empty():
    reg, a, b = ReplyRegistry(), _peer(1), _peer(2)
    reg.add(a, 1, b, 1000)
    reg.expire(0.0)  # stamped
    reg.add(a, 2, b, 1000)  # fresh
    reg.add(b, 3, a, 1000)
    reg.drop_caller(a)
    assert reg.next_deadline() == -math.inf and len(reg) == 1
    reg.drop_replier(a)
    assert reg.next_deadline() is None and reg.fresh == {} and reg.timed == {} and len(reg) == 0


# -- through the router --------------------------------------------------------------------------


def test_callers_that_leave_before_the_reply_leave_nothing_behind(core):
    """Regression (hardening class 6a): 1000 callers x 10 calls, all gone before the service
    answers: no pending entry is left, and the late replies are dropped and counted."""
    svc = CoreClient(core)
    callers = [CoreClient(core) for _ in range(1000)]
    svc.take()
    for c in callers:
        for _ in range(10):
            c.call("Do", dest=svc.name, path="/", interface="org.x.I")
    calls = svc.take()
    assert len(calls) == 10000 and len(core.pending) == 10000
    for c in callers:
        core.disconnect(c.peer)
    assert len(core.pending) == 0
    svc.take()  # NameOwnerChanged and the like, if any
    dropped = core.stats["dropped_replies"]
    for h, _ in calls:
        svc.send(wm.METHOD_RETURN, reply_serial=h.serial, destination=h.sender)
    assert core.stats["dropped_replies"] - dropped == 10000
    assert len(core.pending) == 0 and svc.peer.owed == {}


def _replier_with_calls(core, n_calls, bystanders):
    svc = CoreClient(core)
    callers = [CoreClient(core) for _ in range(5)]
    for i in range(n_calls):
        callers[i % 5].call("Do", dest=svc.name, path="/", interface="org.x.I")
    for _ in range(bystanders):
        CoreClient(core)
    return svc, callers


@needs_python_lines
def test_replier_disconnect_costs_its_own_slots_not_the_bus(core):
    """Regression (hardening class 6b): disconnecting a peer with N pending calls did one
    scan of every peer per call; now the work is the same whatever the number of bystanders."""
    from broker.bus.limits import session_limits
    from broker.bus.router import Bus

    costs = {}
    for n_calls, bystanders in ((100, 0), (100, 400), (200, 0)):
        bus = Bus(session_limits())
        svc, callers = _replier_with_calls(bus, n_calls, bystanders)
        for c in callers:
            c.take()
        costs[n_calls, bystanders] = work(lambda: bus.disconnect(svc.peer))  # noqa: B023
        assert len(bus.pending) == 0
        assert sum(h.error_name == E + "NoReply" for c in callers for h, _ in c.take()) == n_calls
    assert costs[100, 400] <= costs[100, 0] * 1.1, costs  # not the bus's size
    assert costs[200, 0] <= costs[100, 0] * 2.2, costs  # its own calls


def test_replier_disconnect_sends_no_reply_to_each_waiting_call(core):
    svc, callers = _replier_with_calls(core, 10, 0)
    for c in callers:
        c.take()
    core.disconnect(svc.peer)
    for c in callers:
        errs = [(h.error_name, h.reply_serial) for h, _ in c.take() if h.type == wm.ERROR]
        assert [e for e, _ in errs] == [E + "NoReply"] * 2
        assert c.peer.calls == {} and c.peer.replies_pending == 0


def test_reply_timeout_gives_no_reply_and_frees_the_slot(core):
    """reply_timeout was parsed and never enforced: now the bus answers NoReply when it passes."""
    core.limits.reply_timeout = 1000
    caller, svc = CoreClient(core), CoreClient(core)
    serial = caller.call("Do", dest=svc.name, path="/", interface="org.x.I")
    svc.take()
    core.expire_replies(50.0)  # the shell's first look gives the call its deadline: 51.0
    core.expire_replies(50.999)
    assert caller.take() == [] and len(core.pending) == 1
    core.expire_replies(51.0)
    ((h, _),) = caller.take()
    assert h.type == wm.ERROR and h.error_name == E + "NoReply" and h.reply_serial == serial
    assert len(core.pending) == 0 and caller.peer.replies_pending == 0 and svc.peer.owed == {}
    dropped = core.stats["dropped_replies"]
    svc.send(wm.METHOD_RETURN, reply_serial=serial, destination=caller.name)
    assert caller.take() == [] and core.stats["dropped_replies"] == dropped + 1


def test_reply_timeout_off_keeps_calls_pending(core):
    assert core.limits.reply_timeout <= 0
    caller, svc = CoreClient(core), CoreClient(core)
    caller.call("Do", dest=svc.name, path="/", interface="org.x.I")
    core.expire_replies(1e9)
    assert len(core.pending) == 1 and core.replies.next_deadline() is None


async def test_the_trio_timer_enforces_reply_timeout(core, autojump_clock):
    """The shell side: broker/io/timers.py sleeps until the next deadline and hands trio's clock in."""
    from broker.io.timers import run_reply_timer

    class Shell:
        flushes = 0

        def flush_dirty(self):
            Shell.flushes += 1

        class reactor:
            @staticmethod
            def finish_closing():
                pass

    core.limits.reply_timeout = 5000
    caller, svc = CoreClient(core), CoreClient(core)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_reply_timer, core, Shell())
        await trio.sleep(100)  # idle: nothing timed
        start = trio.current_time()
        serial = caller.call("Do", dest=svc.name, path="/", interface="org.x.I")
        await trio.sleep(4.9)
        assert caller.take() == []
        await trio.sleep(0.2)
        ((h, _),) = caller.take()
        assert h.error_name == E + "NoReply" and h.reply_serial == serial
        assert 5.0 <= trio.current_time() - start
        nursery.cancel_scope.cancel()
    assert core.replies.on_armed is None


def test_no_reply_template_gives_the_same_bytes_as_building_each_error():
    import struct

    from broker.bus.router import NO_REPLY_GONE, error_template

    raw, at = error_template(":1.42", E + "NoReply", NO_REPLY_GONE)
    for serial, reply_serial in ((1, 1), (7, 0xFFFFFFFF), (0x12345678, 300), (0xFFFFFFFF, 65536)):
        buf = bytearray(raw)
        struct.pack_into("<I", buf, 8, serial)
        struct.pack_into("<I", buf, at, reply_serial)
        assert bytes(buf) == wm.error_message(serial, reply_serial, ":1.42", E + "NoReply", NO_REPLY_GONE)
