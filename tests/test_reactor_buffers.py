"""Receive buffers: kept while a connection reads, given back when it stops,
so thousands of idle connections cost no buffer each (nor an empty outbox deque)."""

import time

from jeepney import DBusAddress, new_method_call
from jeepney.io.blocking import open_dbus_connection

from broker.bus.peer import Creds, OutItem, Peer, UserAccount
from broker.io.reactor import Reactor
from broker.wire.framer import Framer
from broker.wire.message import build_message
from tests.conftest import start_sealbus


class _Conn:
    def __init__(self):
        self.dying = False
        self.peer = Peer(0, Creds(0), UserAccount(0))
        self.framer = Framer()
        self.framer.feed(build_message(1, 1, path="/a", member="M", destination="org.x.D"))


def test_sweep_gives_back_buffers_of_connections_that_stopped_reading():
    r = Reactor(server=None)
    busy, stopped = _Conn(), _Conn()
    r.touched |= {busy, stopped}
    r.sweep(quiet=False)
    assert busy.framer._buf is not None and stopped.framer._buf is not None  # read in the last interval
    r.touched.add(busy)
    r.sweep(quiet=False)
    assert busy.framer._buf is not None  # still reading
    assert stopped.framer._buf is None  # did not read since the previous sweep
    r.sweep(quiet=True)
    assert busy.framer._buf is None  # the bus went quiet: everything is given back


def test_sweep_gives_back_empty_outboxes_and_keeps_full_ones():
    r = Reactor(server=None)
    idle, waiting = _Conn(), _Conn()
    for c in (idle, waiting):
        c.peer.enqueue(OutItem([b"x"], 1, None, None))
    idle.peer.item_done(idle.peer.outbox.popleft())  # written
    r.touched |= {idle, waiting}
    r.sweep(quiet=True)
    assert idle.peer.outbox == ()  # an idle peer holds no deque
    assert len(waiting.peer.outbox) == 1  # what is queued stays
    idle.peer.enqueue(OutItem([b"y"], 1, None, None))
    assert len(idle.peer.outbox) == 1 and idle.peer.out_bytes == 1


def test_buffer_in_use_by_a_queued_message_is_kept():
    r = Reactor(server=None)
    c = _Conn()
    c.framer.feed(build_message(1, 2, path="/a", member="M", destination="org.x.D"))
    held = c.framer._view[0:4]  # a message view still queued somewhere
    r.touched.add(c)
    r.sweep(quiet=True)
    assert c.framer._buf is not None
    held.release()
    r.touched.add(c)
    r.sweep(quiet=True)
    assert c.framer._buf is None


def test_idle_connections_hold_no_receive_buffer(tmp_path):
    bus = start_sealbus(tmp_path)
    conns = []
    try:
        dbus = DBusAddress("/org/freedesktop/DBus", bus_name="org.freedesktop.DBus",
                           interface="org.freedesktop.DBus")  # fmt: skip
        warm = open_dbus_connection(bus.address)
        warm.send_and_get_reply(new_method_call(dbus, "GetId"), timeout=10)
        time.sleep(0.3)
        before = bus.rss_kib()
        for _ in range(200):
            c = open_dbus_connection(bus.address)  # Hello
            c.send_and_get_reply(new_method_call(dbus, "GetId"), timeout=10)
            conns.append(c)
        time.sleep(0.5)
        per_conn = (bus.rss_kib() - before) / len(conns)
        assert per_conn < 24, f"{per_conn:.1f} KiB per idle connection: receive buffers (64 KiB) were kept"
    finally:
        for c in conns:
            c.close()
        bus.stop()
