"""Stateful test of the bus core: random sequences of what clients do, invariants after every step.

A hypothesis ``RuleBasedStateMachine`` drives the sans-IO core (broker/bus/: Bus,
router, driver, registries) with real wire messages through ``CoreClient``
(connect, Hello, RequestName/ReleaseName, AddMatch/RemoveMatch, BecomeMonitor,
method calls to unique and well-known names, replies and errors, signals,
messages carrying fds to one peer or many, reply timeouts, kills and
disconnects) from several uids, with small limits and a small fd pool so the
refusal paths run too. Outboxes fill until a "deliver" step drains one, as the
I/O shell would write it. After every step it checks what the registries must
agree on: every pending reply and match rule belongs to a live peer and to
that peer's own share; per-uid accounts (connections, queued bytes, fds in
flight and held) equal what that uid's peers hold; every fd handed to the core
is either queued or listed once to be closed; name queues hold live, distinct
peers that know their names, in the order an independent model of the
specification gives; and once everyone disconnects, nothing is left.

Bounded in ``make test``; ``SEALBUS_FUZZ_SECONDS=N`` (``make fuzz``) repeats it for N seconds.
"""

import os
import time

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from broker.bus.lifecycle import ACTIVE, GONE
from broker.bus.limits import Limits
from broker.bus.peer import Creds
from broker.bus.router import Bus
from broker.wire import message as wm

from .conftest import CoreClient

UIDS = (0, 1000, 1001)
OWN = Creds(4242, (4242,), 1, None)  # the bus's own uid: not one of the clients'
NAMES = ("org.x.A", "org.x.B")  # few, so that peers contend for them and queue
RULES = (
    "type='signal'",
    "type='signal',interface='org.x.I'",
    "type='signal',member='Tick'",
    "sender='org.x.A'",
    "type='signal',arg0='a'",
    "type='method_call',eavesdrop='true'",  # allowed: the core runs with no policy (the session default)
    "path='/p'",
)
MONITOR_RULES = ((), ("type='signal'",), ("type='method_call'", "interface='org.x.I'"))


ALLOW_REPLACEMENT, REPLACE_EXISTING, DO_NOT_QUEUE = 1, 2, 4  # RequestName flags, pinned from the spec


class NameModel:
    """Name ownership as the D-Bus specification words it (RequestName/ReleaseName), written
    independently of broker/bus/names.py: per name, the queue of (client, flags), primary owner first."""

    def __init__(self, max_names: int):
        self.queues: dict[str, list] = {}
        self.max_names = max_names

    def held(self, c) -> set:
        return {n for n, q in self.queues.items() if any(x is c for x, _ in q)}

    def request(self, name: str, c, flags: int) -> None:
        if name not in self.held(c) and len(self.held(c)) + 1 >= self.max_names:  # the unique name counts
            return  # LimitsExceeded
        q = self.queues.setdefault(name, [])
        entry = next((e for e in q if e[0] is c), None)
        if not q:
            q.append((c, flags))
        elif q[0][0] is c:
            q[0] = (c, flags)  # the primary owner updates its flags
        elif flags & REPLACE_EXISTING and q[0][1] & ALLOW_REPLACEMENT:
            if entry:
                q.remove(entry)
            old = q.pop(0)
            if not old[1] & DO_NOT_QUEUE:
                q.insert(0, old)  # the replaced owner waits at the head of the queue
            q.insert(0, (c, flags))
        elif flags & DO_NOT_QUEUE:
            if entry:
                q.remove(entry)  # EXISTS: and it leaves the queue it was in
        elif entry:
            q[q.index(entry)] = (c, flags)
        else:
            q.append((c, flags))
        if not q:
            del self.queues[name]

    def release(self, name: str, c) -> None:
        q = self.queues.get(name, [])
        q[:] = [e for e in q if e[0] is not c]
        if not q:
            self.queues.pop(name, None)

    def drop(self, c) -> None:
        for name in list(self.queues):
            self.release(name, c)


FD_POOL = 24


def small_limits() -> Limits:
    lim = Limits()
    lim.max_names_per_connection = 2
    lim.max_match_rules_per_connection = 3
    lim.max_replies_per_connection = 2
    lim.max_connections_per_user = 4
    lim.max_completed_connections = 9
    lim.reply_timeout = 1000  # ms, on the clock the "time passes" step advances
    return lim


class BusMachine(RuleBasedStateMachine):
    @initialize()
    def start(self):
        self.bus = Bus(small_limits(), own=OWN)
        self.clients: list[CoreClient] = []
        self.ever: list[CoreClient] = []  # for the final check: every peer that ever connected
        self.now = 0.0
        self.names = NameModel(self.bus.limits.max_names_per_connection)
        self.bus.fd_quota.pool = FD_POOL  # small: the fd-share refusal runs too
        self.next_fd = 1000  # fds are plain numbers: the core never touches them, it only lists them to close
        self.handed_in: set[int] = set()
        self.closed: list[int] = []
        for uid in UIDS:  # one client per uid from the start: most steps then have someone to talk to
            self._connect(uid, True)

    # -- helpers ---------------------------------------------------------------

    def live(self) -> list[CoreClient]:
        """Clients still connected. The core disconnects some by itself (a monitor that sends, for one):
        with no I/O shell attached, ``Bus.kill`` disconnects at once, so no peer stays CLOSING."""
        for c in self.clients:
            if c.peer.state is GONE or c.peer.monitor:
                self.names.drop(c)  # disconnected, or a monitor now: it holds no names
        self.clients = [c for c in self.clients if c.peer.state is not GONE]
        return self.clients

    def pick(self, i: int) -> CoreClient:
        live = self.live()
        return live[i % len(live)]

    # -- what clients do -------------------------------------------------------

    @rule(uid=st.sampled_from(UIDS), hello=st.sampled_from((True, True, True, False)))
    def connect(self, uid, hello):
        """A new client; now and then one that skips Hello (the core disconnects it at its first message)."""
        self._connect(uid, hello)

    def _connect(self, uid: int, hello: bool) -> None:
        creds = Creds(uid, (uid,), 100 + len(self.ever))
        if self.bus.refusal(creds) is not None:  # the shell answers Hello with LimitsExceeded, or refuses
            return
        c = CoreClient(self.bus, uid=uid, pid=creds.pid, gids=(uid,), hello=hello)
        c.received_calls = []
        self.clients.append(c)
        self.ever.append(c)

    @precondition(lambda self: self.live())
    @rule(i=st.integers(0, 50), name=st.sampled_from(NAMES), flags=st.sampled_from((0, 0, 1, 2, 2, 3, 4, 5, 6, 7)))
    def request_name(self, i, name, flags):
        c = self.pick(i)
        c.call("RequestName", "su", (name, flags))
        if c.peer.state is ACTIVE and not c.peer.monitor:  # else the core refused it, and the model drops it
            self.names.request(name, c, flags)

    @precondition(lambda self: self.live())
    @rule(i=st.integers(0, 50), name=st.sampled_from(NAMES))
    def release_name(self, i, name):
        c = self.pick(i)
        c.call("ReleaseName", "s", (name,))
        self.names.release(name, c)

    @precondition(lambda self: self.live())
    @rule(i=st.integers(0, 50), text=st.sampled_from(RULES))
    def add_match(self, i, text):
        self.pick(i).call("AddMatch", "s", (text,))

    @precondition(lambda self: self.live())
    @rule(i=st.integers(0, 50), text=st.sampled_from(RULES))
    def remove_match(self, i, text):
        self.pick(i).call("RemoveMatch", "s", (text,))

    @precondition(lambda self: self.live())
    @rule(i=st.integers(0, 50), rules=st.sampled_from(MONITOR_RULES))
    def become_monitor(self, i, rules):
        self.pick(i).call("BecomeMonitor", "asu", (list(rules), 0), interface="org.freedesktop.DBus.Monitoring")

    @precondition(lambda self: self.live())
    @rule(i=st.integers(0, 50), j=st.integers(0, 50), by_name=st.booleans(), no_reply=st.booleans())
    def call(self, i, j, by_name, no_reply):
        caller, target = self.pick(i), self.pick(j)
        dest = NAMES[j % len(NAMES)] if by_name else (target.name or ":1.999")  # :1.999: nobody
        flags = wm.NO_REPLY_EXPECTED if no_reply else 0
        caller.call("M", "s", ("x",), dest=dest, path="/p", interface="org.x.I", flags=flags)

    @precondition(lambda self: any(c.received_calls for c in self.clients))
    @rule(i=st.integers(0, 50), error=st.booleans(), forged=st.booleans())
    def reply(self, i, error, forged):
        busy = [c for c in self.live() if c.received_calls]
        if not busy:
            return
        c = busy[i % len(busy)]
        caller, serial = c.received_calls.pop(i % len(c.received_calls))
        if forged:
            serial += 1000  # a reply nobody asked for: dropped, never delivered
        if error:
            c.send(wm.ERROR, reply_serial=serial, destination=caller, error_name="org.x.Failed")
        else:
            c.send(wm.METHOD_RETURN, reply_serial=serial, destination=caller, signature="s", body=("ok",))

    @precondition(lambda self: self.live())
    @rule(i=st.integers(0, 50), arg0=st.sampled_from(("a", "b")), member=st.sampled_from(("Tick", "Tock")))
    def signal(self, i, arg0, member):
        self.pick(i).signal("org.x.I", member, "s", (arg0,), path="/p")

    @precondition(lambda self: self.live())
    @rule(i=st.integers(0, 50))
    def deliver(self, i):
        """The shell writes one client's outbox; the client notes the method calls it must answer."""
        c = self.pick(i)
        for h, _ in c.take():
            if h.type == wm.METHOD_CALL and h.destination != "org.freedesktop.DBus" and not c.peer.monitor:
                if not h.flags & wm.NO_REPLY_EXPECTED:
                    c.received_calls.append((h.sender, h.serial))

    @precondition(lambda self: self.live())
    @rule(i=st.integers(0, 50), j=st.integers(0, 50), n=st.integers(1, 6), broadcast=st.booleans())
    def send_fds(self, i, j, n, broadcast):
        """A message carrying ``n`` fds: a signal to every matching peer (one FdRef, many copies) or a call."""
        from broker.wire.message import HeaderView, build_message

        c = self.pick(i)
        fds = list(range(self.next_fd, self.next_fd + n))
        self.next_fd += n
        self.handed_in.update(fds)
        c.serial += 1
        fields = {"path": "/p", "interface": "org.x.I", "member": "Tick"}
        if not broadcast:
            target = self.pick(j)
            fields.update(member="M", destination=target.name or ":1.999")
        raw = build_message(wm.SIGNAL if broadcast else wm.METHOD_CALL, c.serial, signature="h" * n,
                            body=tuple(range(n)), unix_fds=n, **fields)  # fmt: skip
        self.bus.dispatch(c.peer, (HeaderView(memoryview(raw)), fds))

    @rule(ms=st.integers(0, 1500))
    def time_passes(self, ms):
        self.now += ms / 1000
        self.bus.expire_replies(self.now)

    @precondition(lambda self: self.live())
    @rule(i=st.integers(0, 50), kill=st.booleans())
    def disconnect(self, i, kill):
        c = self.pick(i)
        self.clients.remove(c)
        self.names.drop(c)
        if kill:
            self.bus.kill(c.peer, "killed by the test")  # no shell hook: the core disconnects at once
        else:
            self.bus.disconnect(c.peer, "hung up")

    # -- invariants --------------------------------------------------------------

    @invariant()
    def only_live_peers_are_registered(self):
        if not hasattr(self, "bus"):
            return
        live = {c.peer for c in self.live()}
        assert self.bus.all_peers == live, "a peer left without being disconnected, or stayed after"
        for c in self.clients:
            assert c.peer.state is ACTIVE
        for name, p in self.bus.peers.items():
            assert p in live and p.unique_name == name
        assert set(self.bus.monitors) <= live
        for p in live:
            if p.monitor:
                assert not p.names and not p.matches and p.unique_name not in self.bus.peers

    @invariant()
    def pending_replies_belong_to_live_peers(self):
        if not hasattr(self, "bus"):
            return
        live = self.bus.all_peers
        slots = set()
        for p in live:
            assert p.replies_pending == len(p.calls)
            assert len(p.calls) <= self.bus.limits.max_replies_per_connection
            for serial, slot in p.calls.items():
                assert slot.caller is p and slot.serial == serial
                assert slot.replier in live and slot in slot.replier.owed
                slots.add(slot)
        owed = {slot for p in live for slot in p.owed}
        assert owed == slots, "a reply is owed that no caller waits for, or the reverse"
        assert len(self.bus.replies) == len(slots)
        timed = set(self.bus.replies.fresh) | {s for g in self.bus.replies.timed.values() for s in g}
        assert timed == slots  # reply_timeout is on: every slot is timed, and only live ones

    @invariant()
    def match_rules_belong_to_live_peers(self):
        if not hasattr(self, "bus"):
            return
        live = self.bus.all_peers
        total = 0
        eaves: dict = {}
        for p in live:
            total += len(p.matches)
            assert len(p.matches) <= self.bus.limits.max_match_rules_per_connection
            assert sorted(map(id, p.matches)) == sorted(id(r) for rs in p.match_keys.values() for r in rs)
            for match in p.matches:
                assert match.owner is p
                if match.eavesdrop:
                    eaves[p] = eaves.get(p, 0) + 1
        assert len(self.bus.matches) == total
        assert self.bus.matches.eavesdroppers == eaves
        indexed = len(self.bus.matches.index) + len(self.bus.matches.eaves)
        assert indexed == total, "the match index holds rules nobody owns"

    @invariant()
    def per_uid_accounts_equal_what_peers_hold(self):
        if not hasattr(self, "bus"):
            return
        for uid, acct in self.bus.accounts.items():
            mine = [p for p in self.bus.all_peers if p.creds.uid == uid]
            assert acct.connections == len(mine), uid
            assert acct.outgoing_bytes == sum(p.out_bytes for p in mine), uid
        for p in self.bus.all_peers:
            assert p.out_bytes == sum(item.charge for item in p.outbox)

    @invariant()
    def name_queues_are_consistent(self):
        if not hasattr(self, "bus"):
            return
        self.live()  # the model forgets who left or became a monitor
        live = self.bus.all_peers
        held = {p: set() for p in live}
        for name, q in self.bus.registry.queues.items():
            assert q, f"empty queue left for {name}"
            peers = [o.peer for o in q]
            assert len(set(peers)) == len(peers), f"a peer queued twice for {name}"
            for p in peers:
                assert p in live and name in p.names
                held[p].add(name)
            assert self.bus.resolve(name) is peers[0]
            want = [(c.peer, f) for c, f in self.names.queues.get(name, [])]
            assert [(o.peer, o.flags) for o in q] == want, f"{name}: not the queue the specification gives"
        assert set(self.bus.registry.queues) == set(self.names.queues)
        for p in live:
            assert p.names == held[p], "a peer believes it holds a name the registry does not list"
            assert len(p.names) <= self.bus.limits.max_names_per_connection

    @invariant()
    def every_fd_is_held_or_closed_once(self):
        """Fds the core got are either referenced by a queued copy (charged to the sender's uid) or listed
        once for the shell to close; per-uid fd counts and the shared fd pool agree with the queues."""
        if not hasattr(self, "bus"):
            return
        while self.bus.closing:  # what the shell closes after each pass
            fds, _sender = self.bus.closing.pop()
            self.closed.extend(fds)
        assert len(self.closed) == len(set(self.closed)), "an fd was listed to close twice"
        refs = {id(item.fdref): item.fdref for p in self.bus.all_peers for item in p.outbox if item.fdref}
        held = [fd for ref in refs.values() for fd in ref.fds]
        assert not set(held) & set(self.closed), "a queued copy refers to an fd already closed"
        assert set(held) | set(self.closed) == self.handed_in, "an fd was lost, neither queued nor closed"
        inflight: dict[int, int] = {}
        for p in self.bus.all_peers:
            assert p.out_fds == sum(len(item.fdref.fds) for item in p.outbox if item.fdref)
            for item in p.outbox:
                if item.fdref is not None and item.owner is not None:
                    inflight[item.owner.uid] = inflight.get(item.owner.uid, 0) + len(item.fdref.fds)
        message_fds: dict[int, int] = {}
        for ref in refs.values():
            if ref.owner is not None:
                message_fds[ref.owner.uid] = message_fds.get(ref.owner.uid, 0) + len(ref.fds)
        for uid, acct in self.bus.accounts.items():
            assert acct.inflight_fds == inflight.get(uid, 0), uid
            assert acct.message_fds == message_fds.get(uid, 0), uid
        used = sum(a.message_fds + a.held_fds for a in self.bus.accounts.values())
        assert self.bus.fd_quota.used == used <= FD_POOL
        assert self.bus.fd_quota.users == sum(1 for a in self.bus.accounts.values() if a.message_fds + a.held_fds)

    def teardown(self):
        if not hasattr(self, "bus"):
            return
        for c in list(self.live()):
            self.bus.disconnect(c.peer, "end of test")
        self.clients.clear()
        bus = self.bus
        assert not bus.all_peers and not bus.peers and not bus.monitors
        assert len(bus.replies) == 0 and not bus.replies.fresh and not bus.replies.timed
        assert len(bus.matches) == 0 and not bus.matches.eavesdroppers
        assert len(bus.matches.index) == 0 and len(bus.matches.eaves) == 0
        assert not bus.registry.queues
        for acct in bus.accounts.values():
            assert (acct.connections, acct.outgoing_bytes, acct.inflight_fds) == (0, 0, 0)
            assert (acct.message_fds, acct.held_fds) == (0, 0)
        assert bus.fd_quota.used == 0 and bus.fd_quota.users == 0
        while bus.closing:
            self.closed.extend(bus.closing.pop()[0])
        assert sorted(self.closed) == sorted(self.handed_in), "every fd the bus got is closed, once"
        for c in self.ever:
            assert c.peer.state is GONE
            assert not c.peer.outbox and c.peer.out_bytes == 0
            assert not c.peer.calls and not c.peer.owed and not c.peer.matches and not c.peer.names


SETTINGS = settings(max_examples=60, stateful_step_count=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])  # fmt: skip


def run_for_budget(machine, budget_settings) -> None:
    """Once (make test), or repeatedly for SEALBUS_FUZZ_SECONDS (make fuzz)."""
    seconds = float(os.environ.get("SEALBUS_FUZZ_SECONDS", "0") or 0)
    end = time.monotonic() + seconds
    while True:
        run_state_machine_as_test(machine, settings=budget_settings)
        if time.monotonic() >= end:
            break


def test_bus_core_state_machine():
    run_for_budget(BusMachine, SETTINGS)
