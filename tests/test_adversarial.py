"""Hostile clients: each attack costs the attacker its own connection at most."""

import array
import os
import socket
import struct
import time

import pytest
from jeepney import DBusAddress, MatchRule, message_bus, new_method_call, new_signal
from jeepney.io.blocking import open_dbus_connection

from broker.wire.message import build_message

from .conftest import ensure_test_users, run_as


def raw_connect(bus, uid=None) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(bus.path))
    return s


def authenticate(s: socket.socket, uid: int | None = None) -> bytes:
    uid = os.getuid() if uid is None else uid
    s.sendall(b"\0AUTH EXTERNAL " + str(uid).encode().hex().encode() + b"\r\n")
    reply = s.recv(4096)
    if reply.startswith(b"OK"):
        s.sendall(b"NEGOTIATE_UNIX_FD\r\n")
        s.recv(4096)
        s.sendall(b"BEGIN\r\n")
    return reply


def hello(s: socket.socket) -> None:
    s.sendall(build_message(1, 1, path="/org/freedesktop/DBus", interface="org.freedesktop.DBus",
                            member="Hello", destination="org.freedesktop.DBus"))  # fmt: skip
    s.recv(65536)


def closed(s: socket.socket, timeout=10) -> bool:
    s.settimeout(timeout)
    try:
        while True:
            if not s.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def alive(bus) -> bool:
    c = open_dbus_connection(bus.address)
    r = c.send_and_get_reply(new_method_call(DBusAddress("/", bus_name="org.freedesktop.DBus",
                                                         interface="org.freedesktop.DBus.Peer"), "Ping"), timeout=5)  # fmt: skip
    c.close()
    return r.header.message_type.value == 2


def test_external_with_another_uid_is_rejected(sealbus):
    s = raw_connect(sealbus)
    assert authenticate(s, uid=os.getuid() + 4242).startswith(b"REJECTED")
    assert alive(sealbus)


def test_message_before_hello_disconnects(sealbus):
    s = raw_connect(sealbus)
    authenticate(s)
    s.sendall(build_message(1, 1, path="/", interface="org.freedesktop.DBus", member="ListNames",
                            destination="org.freedesktop.DBus"))  # fmt: skip
    assert closed(s)
    assert alive(sealbus)


def test_malformed_message_disconnects_only_that_client(sealbus):
    bystander = open_dbus_connection(sealbus.address)
    s = raw_connect(sealbus)
    authenticate(s)
    hello(s)
    bad = bytearray(build_message(1, 2, path="/", member="M", destination="org.x.Y", signature="s", body=("ok",)))
    bad[3] = 9  # protocol version 9
    s.sendall(bad)
    assert closed(s)
    s2 = raw_connect(sealbus)
    authenticate(s2)
    hello(s2)
    s2.sendall(b"l\x01\x00\x01" + struct.pack("<III", 0, 1, 0xFFFFFFF0))  # absurd header length
    assert closed(s2)
    assert alive(sealbus)
    assert bystander.send_and_get_reply(message_bus.ListNames()).body


def test_unexpected_reply_is_dropped(sealbus):
    victim = open_dbus_connection(sealbus.address)
    attacker = raw_connect(sealbus)
    authenticate(attacker)
    hello(attacker)
    forged = build_message(2, 5, reply_serial=1, destination=victim.unique_name, signature="s", body=("forged",))
    attacker.sendall(forged)
    victim.send(new_signal(DBusAddress("/", interface="org.x.Marker"), "M"))  # nothing routed to victim
    # The victim asks for something real; the forged reply must never show up.
    reply = victim.send_and_get_reply(message_bus.GetId(), timeout=5)
    assert reply.body[0] and reply.body != ("forged",)
    with pytest.raises(TimeoutError):
        while True:
            m = victim.receive(timeout=0.5)
            assert m.body != ("forged",)


def test_spoofed_sender_is_replaced(sealbus):
    sub = open_dbus_connection(sealbus.address)
    sub.send_and_get_reply(message_bus.AddMatch(MatchRule(type="signal", interface="org.x.Spoof")))
    s = raw_connect(sealbus)
    authenticate(s)
    s.sendall(build_message(1, 1, path="/org/freedesktop/DBus", interface="org.freedesktop.DBus",
                            member="Hello", destination="org.freedesktop.DBus"))  # fmt: skip
    s.sendall(build_message(4, 2, path="/", interface="org.x.Spoof", member="S", sender="org.freedesktop.DBus"))
    m = sub.receive(timeout=5)
    while m.header.fields.get(next(iter(f for f in m.header.fields if f.value == 2)), None) != "org.x.Spoof":
        m = sub.receive(timeout=5)
    sender = {f.value: v for f, v in m.header.fields.items()}[7]
    assert sender.startswith(":1.") and sender != "org.freedesktop.DBus"


def test_fd_flood_disconnects_and_leaks_nothing(sealbus):
    base = sealbus.fd_count()
    for _ in range(3):
        s = raw_connect(sealbus)
        authenticate(s)
        hello(s)
        fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(250)]
        msg = build_message(1, 2, path="/", member="M", destination="org.x.Y", signature="h" * 250,
                            body=tuple(range(250)), unix_fds=250)  # fmt: skip
        try:
            s.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        except OSError:
            pass
        for fd in fds:
            os.close(fd)
        assert closed(s)  # more than max_message_unix_fds: disconnected
        s.close()
    time.sleep(0.3)
    assert sealbus.fd_count() <= base + 1
    assert alive(sealbus)


def test_slow_reader_does_not_stall_others(sealbus_factory, tmp_path):
    conf = tmp_path / "small.conf"
    conf.write_text("""<busconfig><type>session</type><policy context="default">
      <allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/><allow own="*"/></policy>
      <limit name="max_outgoing_bytes">200000</limit></busconfig>""")
    bus = sealbus_factory("--config", str(conf))
    stuck = raw_connect(bus)
    authenticate(stuck)
    hello(stuck)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.sendall(build_message(1, 2, path="/org/freedesktop/DBus", interface="org.freedesktop.DBus",
                                member="AddMatch", destination="org.freedesktop.DBus", signature="s",
                                body=("type='signal',interface='org.x.Flood'",)))  # fmt: skip
    time.sleep(0.2)
    flooder = open_dbus_connection(bus.address)
    other = open_dbus_connection(bus.address)
    payload = "x" * 4000
    worst = 0.0
    for i in range(400):
        flooder.send(new_signal(DBusAddress("/", interface="org.x.Flood"), "F", "s", (payload,)))
        if i % 20 == 0:
            t = time.monotonic()
            other.send_and_get_reply(message_bus.GetId(), timeout=5)
            worst = max(worst, time.monotonic() - t)
    assert worst < 1.0, f"a bystander waited {worst:.2f}s"
    assert closed(stuck, timeout=10)  # the reader that never reads was disconnected
    log = (tmp_path / "bus.log").read_text()
    assert "cannot take its signals" in log and "uid=" in log


def test_connection_flood_from_one_uid(sealbus_factory, tmp_path, test_users):
    u1, u2 = test_users
    conf = tmp_path / "conn.conf"
    conf.write_text("""<busconfig><type>system</type><policy context="default"><allow user="*"/>
      <allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/><allow own="*"/></policy>
      <limit name="max_connections_per_user">5</limit></busconfig>""")
    bus = sealbus_factory("--config", str(conf))
    script = f"""
import socket, sys
from jeepney.io.blocking import open_dbus_connection
conns, refused = [], 0
for i in range(8):
    try:
        conns.append(open_dbus_connection({bus.address!r}))
    except Exception:
        refused += 1
print(len(conns), refused)
"""
    out = run_as(u1, [os.path.join(os.path.dirname(os.sys.executable), "python"), "-c", script])
    ok, refused = map(int, out.stdout.split())
    assert ok == 5 and refused == 3, out.stderr
    out = run_as(u2, [os.path.join(os.path.dirname(os.sys.executable), "python"), "-c", script.replace("8", "2")])
    assert out.stdout.split()[0] == "2", out.stderr  # another uid is unaffected
    assert "max_connections_per_user" in (tmp_path / "bus.log").read_text()
    ensure_test_users()
