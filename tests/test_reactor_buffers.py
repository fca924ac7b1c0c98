"""Receive buffers: kept while a connection reads, given back when it stops,
so thousands of idle connections cost no buffer each."""

import time

from jeepney import DBusAddress, new_method_call
from jeepney.io.blocking import open_dbus_connection

from broker.io.reactor import Reactor
from broker.wire.framer import Framer
from broker.wire.message import build_message
from tests.conftest import start_sealbus


class _Conn:
    def __init__(self):
        self.dying = False
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
