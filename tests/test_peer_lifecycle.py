"""One client lifecycle (bus/lifecycle.py): AUTHENTICATING → ACTIVE → CLOSING → GONE.

The table first (every legal transition allowed, every other one raises),
then the behaviour through the sans-IO core, then through real Connections
over socketpairs (driven without a broker process, as tests/test_pinned_buffers.py).
"""

import fcntl
import itertools
import os
import socket
import struct
import termios
import time

import pytest
import trio
import trio.testing

from broker.bus.lifecycle import (
    ACTIVE,
    AUTHENTICATING,
    CLOSING,
    GONE,
    TRANSITIONS,
    LifecycleError,
    PeerState,
    transition,
)
from broker.bus.limits import Limits
from broker.bus.peer import Creds
from broker.bus.router import Bus
from broker.io.connection import Connection
from broker.io.server import Server
from broker.wire.framer import Framer
from broker.wire.message import build_message

from .conftest import CoreClient, start_sealbus

DBUS = dict(path="/org/freedesktop/DBus", interface="org.freedesktop.DBus", destination="org.freedesktop.DBus")

LEGAL = {
    (AUTHENTICATING, ACTIVE),  # authenticated and admitted: the bus has a Peer for it
    (AUTHENTICATING, GONE),  # failed, timed out, refused or evicted
    (ACTIVE, CLOSING),  # killed or hung up: closed after the current pass
    (ACTIVE, GONE),  # disconnected at once (no I/O shell, shutdown)
    (CLOSING, GONE),  # the shell closed it
}


# -- the table ---------------------------------------------------------------------------------


@pytest.mark.parametrize("old,new", sorted(LEGAL))
def test_every_legal_transition_is_allowed(old, new):
    assert transition(old, new) is new


@pytest.mark.parametrize("old,new", [p for p in itertools.product(PeerState, PeerState) if p not in LEGAL])
def test_every_other_transition_raises(old, new):
    with pytest.raises(LifecycleError, match=f"{old.name} -> {new.name}"):
        transition(old, new)


def test_the_table_is_exactly_the_documented_one():
    assert {(a, b) for a, targets in TRANSITIONS.items() for b in targets} == LEGAL
    assert not TRANSITIONS[GONE]  # terminal


def test_only_active_is_false_so_the_hot_path_tests_one_attribute():
    assert [s for s in PeerState if not s] == [ACTIVE]


def test_peer_refuses_an_illegal_move_and_keeps_its_state(core):
    c = CoreClient(core)
    core.disconnect(c.peer)
    with pytest.raises(LifecycleError):
        c.peer.to(CLOSING, "too late")
    assert c.peer.state is GONE


# -- through the sans-IO bus -------------------------------------------------------------------


def test_a_new_peer_is_active_and_disconnect_makes_it_gone(core):
    c = CoreClient(core)
    assert c.peer.state is ACTIVE and c.peer.reason is None
    core.disconnect(c.peer, "bye")
    assert c.peer.state is GONE and c.peer.reason == "bye"
    assert c.peer not in core.all_peers


def test_disconnect_twice_is_a_no_op(core):
    watcher = CoreClient(core)
    watcher.call("AddMatch", "s", ("type='signal',member='NameOwnerChanged'",))
    watcher.take()
    c = CoreClient(core)
    watcher.take()
    core.disconnect(c.peer, "first")
    assert len(watcher.take()) == 1  # its unique name's NameOwnerChanged, once
    core.disconnect(c.peer, "second")
    assert c.peer.state is GONE and c.peer.reason == "first"
    assert watcher.take() == []
    assert core.account(c.peer.creds.uid).connections == 1  # the watcher's only: not decremented twice


def test_kill_without_a_shell_disconnects_at_once(core):
    c = CoreClient(core)
    core.kill(c.peer, "misbehaved")
    assert c.peer.state is GONE and c.peer.reason == "misbehaved"
    assert c.peer not in core.all_peers
    core.kill(c.peer, "again")  # a no-op, not an illegal transition
    assert c.peer.reason == "misbehaved"


def test_kill_during_routing_defers_the_disconnect_and_the_peer_takes_no_messages(core):
    core.limits.max_outgoing_bytes = 4096
    caller, stuck, other = CoreClient(core), CoreClient(core), CoreClient(core)
    for c in (stuck, other):
        c.call("AddMatch", "s", ("type='signal',interface='org.x.Flood'",))
        c.take()
    killed = []
    stuck.peer.kill = killed.append  # an I/O shell is attached: it closes after the pass
    got = 0
    for _ in range(8):  # stuck never drains: the broadcast that overflows it kills it mid-routing
        caller.signal("org.x.Flood", "F", "s", ("y" * 600,))
        got += len(other.take())
    assert got == 8  # the others got every signal
    (reason,) = killed
    assert reason.startswith("cannot take its signals")
    assert stuck.peer.state is CLOSING and stuck.peer.reason == reason
    assert stuck.peer in core.all_peers and core.conns.by_name.get(stuck.name) is stuck.peer  # still registered
    assert stuck.peer.out_bytes == 0 and not stuck.peer.outbox  # its outbox was dropped
    # it takes nothing more: signals, calls, bus messages
    caller.signal("org.x.Flood", "F", "s", ("z",))
    caller.call("Do", dest=stuck.name, path="/", interface="org.x.I")
    core.send_error(stuck.peer, 1, "org.x.E", "late")
    assert not stuck.peer.outbox
    assert len(other.take()) == 1  # the signal, which other still takes
    # and whatever it still had in flight is dropped, not routed
    before = dict(other.peer.stats)
    n = stuck.peer.stats["in_messages"]
    stuck.signal("org.x.Flood", "F")
    assert stuck.peer.stats["in_messages"] == n and other.take() == [] and other.peer.stats == before
    core.kill(stuck.peer, "again")  # CLOSING already: no second callback
    assert killed == [reason]
    core.disconnect(stuck.peer, stuck.peer.reason)  # what the shell does after the pass
    assert stuck.peer.state is GONE and stuck.peer not in core.all_peers


def test_a_caller_of_a_closing_peer_gets_no_reply_when_it_goes(core):
    caller, svc = CoreClient(core), CoreClient(core)
    caller.call("Do", dest=svc.name, path="/", interface="org.x.I")
    svc.take()
    svc.peer.kill = lambda reason: None
    core.kill(svc.peer, "bad")
    assert caller.take() == []  # nothing until it is gone
    core.disconnect(svc.peer)
    ((h, _),) = caller.take()
    assert h.error_name == "org.freedesktop.DBus.Error.NoReply"


# -- through real Connections over socketpairs ---------------------------------------------------


class Rig:
    """A bus with real Connections whose client ends we hold (as benchmarks/hop_micro.py)."""

    def __init__(self, limits: Limits | None = None):
        self.bus = Bus(limits or Limits())
        self.server = Server(self.bus)
        self.bus.server = self.server

    def creds(self) -> Creds:
        return Creds(os.getuid(), (os.getgid(),), os.getpid(), None)

    def pair(self):
        broker_end, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        broker_end.setblocking(False)
        client_end.setblocking(False)
        return broker_end, client_end

    def connect(self):
        """What Connection.run does once authenticated, without the SASL exchange."""
        broker_end, client_end = self.pair()
        c = Connection(self.server, broker_end, self.creds())
        c.peer = self.bus.connect(c.creds)
        c.peer.wake = self.server.mark_dirty
        c.peer.kill = c._on_kill
        self.server.connections[c.peer] = c
        c.framer = Framer(self.bus.limits.max_message_size, self.bus.limits.max_message_unix_fds)
        self.server.reactor.add(c)
        client_end.send(build_message(1, 1, member="Hello", **DBUS))
        c.on_readable()
        self.server.flush_dirty()
        drain(client_end)
        return c, client_end

    def close(self):
        self.server.reactor.ep.close()


def drain(sock) -> bytes:
    out = b""
    try:
        while True:
            data = sock.recv(1 << 20)
            if not data:
                return out
            out += data
    except BlockingIOError:
        return out


def test_a_protocol_violation_closes_after_the_pass_with_its_reason():
    rig = Rig()
    try:
        c, end = rig.connect()
        end.send(b"garbage that is no D-Bus message at all....")
        c.on_readable()
        assert c.state is CLOSING and c.peer.reason.startswith("protocol violation")
        assert c.peer in rig.bus.all_peers and c in rig.server.reactor.closing  # deferred to the end of the pass
        rig.server.reactor.finish_closing()
        assert c.state is GONE and c.peer not in rig.bus.all_peers
        assert c.fd not in rig.server.reactor.conns and c.peer not in rig.server.connections
        assert c.sock.fileno() == -1 and drain(end) == b""  # the client sees EOF
        c.close()  # closing twice is a no-op
        assert c.state is GONE
    finally:
        rig.close()


def test_a_client_that_hangs_up_takes_no_messages_for_the_rest_of_the_pass():
    """Fails on the old code: EOF marked only the Connection dying, and until the close the
    Peer kept taking (and charging) what others sent it in the same pass."""
    rig = Rig()
    try:
        gone, gone_end = rig.connect()
        sender, sender_end = rig.connect()
        gone_end.close()
        gone.on_readable()  # EOF
        assert gone.state is CLOSING and gone.peer.reason == ""
        sender_end.send(build_message(4, 2, path="/", interface="org.x.I", member="S",
                                      destination=gone.peer.unique_name))  # fmt: skip
        sender.on_readable()  # later in the same pass
        assert not gone.peer.outbox and gone.peer.out_bytes == 0
        assert rig.bus.account(os.getuid()).outgoing_bytes == 0
        rig.server.flush_dirty()
        rig.server.reactor.finish_closing()
        assert gone.state is GONE and gone.peer not in rig.bus.all_peers
        assert sender.state is ACTIVE
    finally:
        rig.close()


def test_an_unauthenticated_connection_evicted_goes_straight_to_gone():
    rig = Rig()
    try:
        broker_end, _client_end = rig.pair()
        c = Connection(rig.server, broker_end, rig.creds())
        assert c.state is AUTHENTICATING and c.peer is None

        async def main():
            c.evict()
            await c.run()  # its task first runs after the eviction: nothing happens

        trio.run(main)
        assert c.state is GONE and c.peer is None and not rig.bus.all_peers
        with pytest.raises(LifecycleError):
            c.evict()  # evicting twice is a bug, not a silent flag
        with pytest.raises(LifecycleError):
            c._state = transition(c._state, ACTIVE)  # nor can it be admitted any more
    finally:
        rig.close()


def test_evicted_while_its_sasl_reply_waits_for_room_it_is_never_admitted():
    """Fails on the old code: the exchange had completed when the eviction closed its socket,
    so the connection was admitted anyway; registering the closed socket (fd -1) raised in its task."""
    rig = Rig()
    try:
        broker_end, client_end = rig.pair()
        broker_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        for size in (4096, 64, 1):  # fill the way to the client, so the SASL reply waits for room
            try:
                while True:
                    broker_end.send(b"x" * size)
            except BlockingIOError:
                pass
        c = Connection(rig.server, broker_end, rig.creds())
        rig.server.unauthenticated.setdefault(c.creds.uid, {})[c] = None
        rig.server.incomplete += 1
        uid = str(os.getuid()).encode().hex().encode()
        client_end.send(b"\0AUTH EXTERNAL " + uid + b"\r\nNEGOTIATE_UNIX_FD\r\nBEGIN\r\n")

        async def main():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(c.run)
                await trio.testing.wait_all_tasks_blocked()
                rig.server._evict(c, "test")

        trio.run(main)
        assert c.state is GONE and c.peer is None and not rig.bus.all_peers
        assert rig.server.incomplete == 0 and not rig.server.reactor.conns
    finally:
        rig.close()


def test_an_internal_error_serving_a_connection_closes_it_with_that_reason(monkeypatch):
    rig = Rig()
    try:
        c, end = rig.connect()

        def boom():
            raise RuntimeError("bug")

        monkeypatch.setattr(c, "on_readable", boom)
        end.send(b"x")

        async def a_moment_of_the_loop():
            with trio.move_on_after(0.2):
                await rig.server.reactor.run()

        trio.run(a_moment_of_the_loop)  # the pass that hits the bug closes it (logged, the bus goes on)
        assert c.state is GONE and c.peer.reason == "internal error"
        assert c.peer not in rig.bus.all_peers
    finally:
        rig.close()


# -- live: the eviction race against a running broker ---------------------------------------------


def _unread(sock) -> int:
    return struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0\0\0\0"))[0]


def _sasl_client(path: str, uid_hex: bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    s.sendall(b"\0AUTH EXTERNAL " + uid_hex + b"\r\n")
    deadline = time.monotonic() + 5
    while not _unread(s) and time.monotonic() < deadline:  # OK <guid>
        time.sleep(0.001)
    return s


def _one_more_reply(s, line: bytes, wait: float) -> bool:
    """Send ``line``; True if its reply arrived within ``wait`` seconds (nobody reads ``s``)."""
    before = _unread(s)
    s.sendall(line)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if _unread(s) > before:
            return True
        time.sleep(0.0005)
    return False


def test_a_client_evicted_as_its_last_sasl_reply_waits_cannot_stop_the_bus(tmp_path):
    """Fails on the old code (the broker exits): a client that never reads fills the broker's
    socket with SASL replies (NEGOTIATE_UNIX_FD may repeat), then sends NEGOTIATE_UNIX_FD and
    BEGIN together, so the exchange is complete while the last reply waits for room; its own
    further connections get it evicted at that moment. The old code admitted the closed socket
    and the ValueError in the connection's task ended the broker's nursery."""
    cfg = tmp_path / "bus.conf"
    cfg.write_text("""<busconfig><type>session</type><policy context="default"><allow user="*"/>
  <allow send_destination="*"/><allow own="*"/></policy>
  <limit name="max_incomplete_connections">8</limit><limit name="auth_timeout">60000</limit></busconfig>""")
    bus = start_sealbus(tmp_path, "--config", str(cfg))
    held = []
    try:
        uid_hex = str(os.getuid()).encode().hex().encode()
        probe = _sasl_client(bus.path, uid_hex)  # how many replies fit before the broker's writes block
        held.append(probe)
        fit = 0
        while _one_more_reply(probe, b"NEGOTIATE_UNIX_FD\r\n", 0.5):
            fit += 1
        victim = _sasl_client(bus.path, uid_hex)
        held.append(victim)
        for _ in range(fit):  # as many as fit: the next reply waits
            assert _one_more_reply(victim, b"NEGOTIATE_UNIX_FD\r\n", 5)
        assert not _one_more_reply(victim, b"NEGOTIATE_UNIX_FD\r\nBEGIN\r\n", 0.3)  # complete; its reply waits
        for _ in range(9):  # past the limits: the oldest incomplete connections (probe, victim) are evicted
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(bus.path))
            held.append(s)
            time.sleep(0.05)
        time.sleep(1)
        assert bus.proc.poll() is None, bus.log_path.read_text()[-2000:]
        fresh = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # and it still serves
        held.append(fresh)
        fresh.settimeout(10)
        fresh.connect(str(bus.path))
        fresh.sendall(b"\0AUTH EXTERNAL " + uid_hex + b"\r\n")
        assert fresh.recv(64).startswith(b"OK ")
        assert "dropped unauthenticated connection" in bus.log_path.read_text()
    finally:
        for s in held:
            s.close()
        bus.stop()
