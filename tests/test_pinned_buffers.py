"""Queued messages must not keep alive more memory than their queue is charged for.

Forwarded messages are views of the sender's receive buffer, and a view keeps
the whole buffer alive. A small message stuck in the queue of a receiver
that does not read used to keep a large receive buffer (a 64 KiB shared one,
or one sized for an 8 MiB message that was dropped) while its queue was
charged a few dozen bytes, so the outgoing limits did not bound the broker's
memory (hardening class 4). These tests drive the framer, the outbox
accounting, the real write path over socketpairs, and a real broker.
"""

import struct

from benchmarks import hop_micro
from broker.bus import peer as peer_mod
from broker.bus.limits import Limits
from broker.bus.peer import Creds, OutItem, Peer, UserAccount
from broker.bus.router import Bus
from broker.io.server import Server
from broker.wire.framer import DEFAULT_BUFFER, Framer
from broker.wire.message import build_message, encode_header

MiB = 1 << 20
DBUS = dict(path="/org/freedesktop/DBus", interface="org.freedesktop.DBus", destination="org.freedesktop.DBus")


def kept_alive(outbox) -> int:
    """Bytes the queued items keep alive, each underlying buffer counted once (computed here, independently)."""
    total = 0
    seen = []
    for item in outbox:
        for b in item.buffers:
            if isinstance(b, memoryview):
                if not any(o is b.obj for o in seen):
                    seen.append(b.obj)
                    total += len(b.obj)
            else:
                total += len(b)
    return total


def pump(framer: Framer, data: bytes, keep, chunk: int = 208 * 1024) -> None:
    """Feed ``data`` the way the I/O shell does (recv_buffer/commit, then take every message), at most
    ``chunk`` bytes a read (about what a unix socket holds); ``keep(msg)`` says whether a message is
    held (queued somewhere) or dropped at once."""
    view = memoryview(data)
    while view:
        buf = framer.recv_buffer()
        n = min(len(buf), len(view), chunk)
        buf[:n] = view[:n]
        buf.release()
        view = view[n:]
        framer.commit(n)
        for _ in map(keep, framer.messages()):  # holds no reference to a dropped message
            pass


# -- framer: a large message's buffer is its own --------------------------------------


def _sig(serial: int, member: str, size: int = 0) -> bytes:
    body = dict(signature="ay", body=(b"%d" % serial * size,)) if size else {}
    return build_message(4, serial, path="/a", interface="org.x.I", member=member, **body)


def test_large_message_coming_in_is_read_into_a_buffer_of_its_own_size():
    small, big, mid = _sig(1, "S"), _sig(2, "Big", 8 * MiB), _sig(3, "Mid", MiB)
    # The 8 MiB message is dropped, and its free buffer is reused from its head: the small message
    # after it may land there, but the 1 MiB one after that, still coming in, moves to a buffer of
    # its own size (a queued view of it would otherwise keep the 8 MiB alive)
    f = Framer(max_message_size=32 * MiB)
    held = []
    pump(f, small + big + small + mid, lambda m: held.append(m) if m.header.member != "Big" else None)
    assert [m.header.member for m in held] == ["S", "S", "Mid"]
    assert len(held[2].header.raw.obj) == len(mid) and held[2].header.raw == mid
    # large messages in use keep their own buffers, each of its size and intact
    f = Framer(max_message_size=32 * MiB)
    bigs = []
    pump(f, big + small + big + mid, lambda m: bigs.append(m) if m.header.member != "S" else None)
    assert [len(m.header.raw.obj) for m in bigs] == [len(big), len(big), len(mid)]
    assert [m.header.raw for m in bigs] == [big, big, mid]
    # a stream of large messages of one size reads each from the head of the same free buffer
    f = Framer(max_message_size=32 * MiB)
    pump(f, big, lambda m: None)
    first = f._buf
    bigs.clear()
    pump(f, big, bigs.append)
    assert bigs[0].header.raw.obj is first and bigs[0].header.raw == big


# -- outbox accounting: settle what stays queued ---------------------------------------


def _peer() -> Peer:
    return Peer(1, Creds(1000), UserAccount(1000))


def _views(buf: bytearray, start: int, nbytes: int) -> list:
    v = memoryview(buf)
    return [v[start : start + 12], b"h" * 20, v[start + 32 : start + nbytes]]


def test_small_queued_item_is_copied_out_of_a_large_buffer():
    buf = bytearray(8 * MiB)
    buf[100:180] = bytes(range(80))
    p = _peer()
    item = OutItem(_views(buf, 100, 80), 80, None, None)
    want = b"".join(bytes(b) for b in item.buffers)
    p.enqueue(item)
    p.settle_outbox()
    assert b"".join(item.buffers) == want
    assert all(not isinstance(b, memoryview) for b in item.buffers)
    assert p.out_bytes == p.account.outgoing_bytes == 80
    buf.append(0)  # no view of the 8 MiB buffer is left: it can be resized (and freed)
    p.item_done(p.outbox.popleft())
    assert p.out_bytes == p.account.outgoing_bytes == 0


def test_large_queued_item_is_charged_its_buffer_not_copied():
    size = peer_mod.COPY_MAX + 1000
    buf = bytearray(size + size // 16)  # a large message's buffer wastes at most a sixteenth
    p = _peer()
    item = OutItem(_views(buf, 0, size), size, None, None)
    pieces = list(item.buffers)
    p.enqueue(item)
    p.settle_outbox()
    assert item.buffers == pieces and item.buffers[2].obj is buf  # its payload was not copied
    assert item.charge == len(buf) + 20
    assert p.out_bytes == p.account.outgoing_bytes == len(buf) + 20
    p.item_done(p.outbox.popleft())
    assert p.out_bytes == p.account.outgoing_bytes == 0


def test_large_item_keeping_over_an_eighth_more_than_its_size_is_copied():
    size = peer_mod.COPY_MAX + 1000
    buf = bytearray(size + size // 4)  # only stripped header fields make a message's buffer that much larger
    p = _peer()
    item = OutItem(_views(buf, 0, size), size, None, None)
    want = b"".join(bytes(b) for b in item.buffers)
    p.enqueue(item)
    p.settle_outbox()
    assert item.buffers == [want] and item.charge == p.out_bytes == size
    buf.append(0)  # no view of it is left


def test_broadcast_copies_share_one_copy_and_settling_is_done_once():
    buf = bytearray(DEFAULT_BUFFER)
    shared = _views(buf, 0, 200)
    a, b = _peer(), _peer()
    ia, ib = OutItem(shared, 200, None, None), OutItem(shared, 200, None, None)
    a.enqueue(ia)
    b.enqueue(ib)
    a.settle_outbox()
    assert ib.buffers is shared and len(shared) == 1 and isinstance(shared[0], bytes)
    copy = shared[0]
    b.settle_outbox()
    a.settle_outbox()
    assert shared[0] is copy  # nothing copied twice
    assert a.out_bytes == b.out_bytes == 200


def test_item_that_owns_its_bytes_is_left_alone():
    p = _peer()
    item = OutItem([b"x" * 100, b"y" * 28], 128, None, None)
    pieces = item.buffers[:]
    p.enqueue(item)
    p.settle_outbox()
    assert item.buffers == pieces and item.charge == 128


# -- the real write path (Connection.flush) over socketpairs -------------------------------


class Rig:
    """A bus with real Connections whose client ends we hold (connected by benchmarks/hop_micro.py)."""

    def __init__(self, limits: Limits):
        self.bus = Bus(limits)
        self.server = Server(self.bus)
        self.bus.server = self.server

    def connect(self):
        c, client_end = hop_micro.connect(self.server)
        self.send(c, client_end, build_message(1, 1, member="Hello", **DBUS))
        drain(client_end)
        return c, client_end

    def send(self, conn, end, data: bytes) -> None:
        """Client ``end`` sends ``data``; the broker reads and routes as it arrives, then flushes."""
        view = memoryview(data)
        while True:
            if view:
                try:
                    view = view[end.send(view[: 1 << 20]) :]
                except BlockingIOError:
                    pass
            conn.on_readable()
            self.server.flush_dirty()
            if not view and not conn.framer.buffered:
                return


def with_unknown_field(serial: int, dest: str, extra: int, body_len: int) -> bytes:
    """A signal carrying an unknown header field of ``extra`` bytes (the bus strips it) and an ``ay`` body."""
    body = struct.pack("<I", body_len) + b"u" * body_len
    hdr = encode_header("l", 4, 0, len(body), serial, path="/a", interface="org.x.Pin", member="U",
                        destination=dest, signature="ay")  # fmt: skip
    fields_end = 16 + struct.unpack_from("<I", hdr, 12)[0]
    field = b"\x64\x02ay\x00" + b"\0" * 3 + struct.pack("<I", extra) + b"x" * extra  # code 100, variant ay
    fields = hdr[16:fields_end] + b"\0" * ((-fields_end) & 7) + field
    raw = hdr[:12] + struct.pack("<I", len(fields)) + fields
    return raw + b"\0" * ((-len(raw)) & 7) + body


def drain(sock) -> int:
    n = 0
    try:
        while True:
            n += len(sock.recv(1 << 20))
    except BlockingIOError:
        return n


def test_queue_of_a_receiver_that_does_not_read_keeps_no_more_than_it_is_charged(monkeypatch):
    rig = Rig(Limits(max_outgoing_bytes=64 * MiB, max_outgoing_bytes_per_user=64 * MiB))
    victim, victim_end = rig.connect()
    attacker, attacker_end = rig.connect()
    calls = []
    real = getattr(peer_mod, "settle", None)
    monkeypatch.setattr(peer_mod, "settle", lambda item: calls.append(item) or real(item), raising=False)
    sig = dict(path="/a", interface="org.x.Pin", destination=victim.peer.unique_name)
    serial = iter(range(10, 10**6))
    # while the victim reads, nothing is copied or even looked at
    for _ in range(50):
        rig.send(attacker, attacker_end, build_message(4, next(serial), member="S", **sig))
        drain(victim_end)
    assert not victim.peer.outbox and not calls
    # now it stops reading: fill its socket, then small signals to it with 4 MiB broadcasts nobody takes
    for _ in range(16):
        rig.send(attacker, attacker_end,
                 build_message(4, next(serial), member="Fill", signature="ay", body=(b"f" * 32768,), **sig))  # fmt: skip
    for _ in range(8):
        rig.send(attacker, attacker_end, build_message(4, next(serial), member="S", **sig))
        rig.send(attacker, attacker_end, build_message(4, next(serial), path="/a", interface="org.x.Nobody",
                                                       member="Big", signature="ay", body=(b"b" * 4 * MiB,)))  # fmt: skip
    # and messages whose large unknown header fields the bus strips: 100 KiB forwarded, 1.1 MiB received
    for _ in range(4):
        rig.send(attacker, attacker_end, with_unknown_field(next(serial), victim.peer.unique_name, MiB, 100 * 1024))
    ob = victim.peer.outbox
    assert len(ob) > 12
    assert kept_alive(ob) <= victim.peer.out_bytes, (kept_alive(ob), victim.peer.out_bytes)
    assert calls  # only items that stayed queued were looked at
    assert victim.peer.out_bytes == victim.peer.account.outgoing_bytes
    # what was queued still arrives intact, in order
    assert [m.header.fields[3] for m in read_all(victim, victim_end)] == ["Fill"] * 16 + ["S"] * 8 + ["U"] * 4
    assert victim.peer.out_bytes == victim.peer.account.outgoing_bytes == 0


def read_all(conn, end) -> list:
    """Let ``conn``'s client end read everything queued for it; the messages, parsed by jeepney."""
    from jeepney.low_level import Parser

    parser = Parser()
    while True:
        try:
            parser.add_data(end.recv(1 << 20))
        except BlockingIOError:
            if not conn.peer.outbox:
                break
        conn.flush()
    out = []
    while (m := parser.get_next_message()) is not None:
        out.append(m)
    return out


def test_monitor_that_does_not_read_keeps_no_more_than_it_is_charged():
    rig = Rig(Limits(max_outgoing_bytes=64 * MiB, max_outgoing_bytes_per_user=64 * MiB))
    mon, mon_end = rig.connect()
    sender, sender_end = rig.connect()
    rig.send(mon, mon_end, build_message(1, 2, member="BecomeMonitor", signature="asu", body=([], 0),
                                         path="/org/freedesktop/DBus", interface="org.freedesktop.DBus.Monitoring",
                                         destination="org.freedesktop.DBus"))  # fmt: skip
    drain(mon_end)
    assert mon.peer.monitor  # from here on it never reads
    serial = iter(range(10, 10**6))
    bcast = dict(path="/a", interface="org.x.I", signature="ay")
    for _ in range(16):
        rig.send(sender, sender_end, build_message(4, next(serial), member="Fill", body=(b"f" * 32768,), **bcast))
    for _ in range(8):
        rig.send(sender, sender_end, build_message(4, next(serial), path="/a", interface="org.x.I", member="S"))
        rig.send(sender, sender_end, build_message(4, next(serial), member="Big", body=(b"b" * MiB,), **bcast))
    ob = mon.peer.outbox
    assert len(ob) > 8
    assert kept_alive(ob) <= mon.peer.out_bytes, (kept_alive(ob), mon.peer.out_bytes)
    assert [m.header.fields[3] for m in read_all(mon, mon_end)] == ["Fill"] * 16 + ["S", "Big"] * 8


# -- a real broker -------------------------------------------------------------------------


def test_attack_does_not_grow_broker_memory_beyond_the_outgoing_limits(sealbus_factory, tmp_path):
    from benchmarks.attack_pinned import attack, config

    per_conn, per_user = 4 * MiB, 8 * MiB
    conf = tmp_path / "limits.conf"
    conf.write_text(config(None, {"max_outgoing_bytes": per_conn, "max_outgoing_bytes_per_user": per_user}))
    bus = sealbus_factory("--config", str(conf))
    # 4 MiB broadcasts (each one's buffer was reused for the next small signal: +120 MiB before the fix),
    # then 63 KiB ones (every small signal kept a 64 KiB buffer of its own: +60 MiB before the fix)
    for rounds, big in ((30, 4 * MiB), (1000, 63 * 1024)):
        r = attack(str(bus.path), bus.pid, rounds=rounds, big=big)
        # what the queues may hold (the per-user limit), the large message being received and
        # one just freed, and allocator slack
        bound = per_user + 2 * big + 16 * MiB
        growth = r["growth_kib"] * 1024
        assert growth <= bound, f"{rounds} x {big}: broker RSS grew {growth / MiB:.1f} MiB, bound {bound / MiB:.1f} MiB"
    assert bus.proc.poll() is None


def test_a_free_large_buffer_is_reused_for_the_next_large_message_of_its_size_only_once_unused():
    """The spare large buffer (framer._spare) saves zeroing a new one per large message; it is taken only
    when no message uses it any more, and only by a message of its exact size."""
    from broker.wire import framer as framer_mod

    big = _sig(2, "Big", 2 * MiB)
    f = Framer(max_message_size=32 * MiB)
    held = []
    pump(f, big, held.append)
    first = held[0].header.raw.obj
    f.release_idle_buffer()
    assert f._buf is not None and first not in framer_mod._spare  # a queued message still uses it
    held.clear()
    f.release_idle_buffer()
    assert f._buf is None and framer_mod._spare == [first] and framer_mod._spare[0] is first
    other = Framer(max_message_size=32 * MiB)  # any connection's next large message of that size
    pump(other, _sig(3, "Big", 4 * MiB), held.append)  # another size: a buffer of its own
    assert held[0].header.raw.obj is not first and framer_mod._spare[0] is first
    pump(other, big, held.append)
    assert held[1].header.raw.obj is first and held[1].header.raw == big and not framer_mod._spare
