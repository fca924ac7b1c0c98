"""Hostile clients: each attack costs the attacker its own connection at most,
and the bus keeps serving everybody else."""

import os
import socket
import struct
import sys
import time

import pytest
from jeepney import DBusAddress, MatchRule, message_bus, new_signal
from jeepney.io.blocking import open_dbus_connection
from jeepney.low_level import HeaderFields

from broker.wire.message import build_message

from .conftest import (
    RawClient,
    assert_fds_back_and_alive,
    bus_is_alive,
    connected,
    describe_msg,
    ensure_test_users,
    run_as,
    wait_until,
)


def test_external_with_another_uid_is_rejected(sealbus):
    c = RawClient(sealbus)
    assert c.authenticate(uid=os.getuid() + 4242).startswith(b"REJECTED")
    assert bus_is_alive(sealbus)


def test_message_before_hello_disconnects(sealbus):
    c = RawClient(sealbus)
    c.authenticate()
    c.call("ListNames")
    assert c.closed_by_peer()
    assert "first message was not Hello" in (sealbus.log_path.read_text())
    assert bus_is_alive(sealbus)


MALFORMED = {
    "protocol version 9": lambda s: build_message(1, s, path="/", member="M", destination="org.x.Y")[:3] + b"\x09"
    + build_message(1, s, path="/", member="M", destination="org.x.Y")[4:],
    "absurd header length": lambda s: b"l\x01\x00\x01" + struct.pack("<III", 0, s, 0xFFFFFFF0),
    "bad endianness": lambda s: b"X" + build_message(1, s, path="/", member="M", destination="org.x.Y")[1:],
    "serial zero": lambda s: build_message(1, 0, path="/", member="M", destination="org.x.Y"),
    "invalid UTF-8 in member": lambda s: build_message(1, s, path="/", member="M\u00e9", destination="org.x.Y")
    .replace(b"M\xc3\xa9", b"M\xc3\x28"),
    "invalid UTF-8 in a string argument": lambda s: build_message(
        1, s, path="/org/freedesktop/DBus", interface="org.freedesktop.DBus", member="RequestName",
        destination="org.freedesktop.DBus", signature="su", body=("org.x.\u00e9\u00e9", 0)).replace(
        "\u00e9\u00e9".encode(), b"\xff\xfe\xfd\xfc"),
    "body shorter than announced, then EOF": lambda s: build_message(1, s, path="/", member="M",
                                                                     destination="org.x.Y", signature="s",
                                                                     body=("x" * 100,))[:-50],
    "signal without interface": lambda s: build_message(4, s, path="/", member="M"),
    "method call to the reserved Local path": lambda s: build_message(
        1, s, path="/org/freedesktop/DBus/Local", member="M", destination="org.x.Y"),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_message_disconnects_only_that_client(sealbus, kind):
    bystander = open_dbus_connection(sealbus.address)
    c = connected(sealbus)
    c.send_raw(MALFORMED[kind](c.next_serial()))
    if kind.endswith("then EOF"):
        c.sock.shutdown(socket.SHUT_WR)
        assert c.closed_by_peer()
    else:
        # invalid string arguments to the driver may get an error reply instead of a disconnect
        c.sock.settimeout(10)
        try:
            msgs = c.until(lambda m: True)
            assert describe_msg(msgs[0])[0] == "error", msgs
        except ConnectionError:
            pass
        else:
            assert "UTF-8 in a string argument" in kind
    assert bystander.send_and_get_reply(message_bus.ListNames(), timeout=10).body
    assert bus_is_alive(sealbus)


def test_unexpected_reply_is_dropped(sealbus):
    victim = connected(sealbus)
    attacker = connected(sealbus)
    for reply_serial in (1, 2, 999):  # includes serials the victim really used with the driver
        attacker.send_raw(build_message(2, attacker.next_serial(), reply_serial=reply_serial,
                                        destination=victim.unique_name, signature="s", body=("forged",)))  # fmt: skip
        attacker.send_raw(build_message(3, attacker.next_serial(), reply_serial=reply_serial,
                                        error_name="org.x.Forged", destination=victim.unique_name))  # fmt: skip
    # The bus handles one connection's messages in order: a marker sent after the
    # forgeries arrives after them if they were delivered at all.
    attacker.send_raw(build_message(4, attacker.next_serial(), path="/", interface="org.x.Marker", member="M",
                                    destination=victim.unique_name))  # fmt: skip
    got = victim.until(lambda m: describe_msg(m)[1] == "M")
    assert [describe_msg(m)[:2] for m in got] == [("signal", "M")], got


def test_spoofed_sender_is_replaced_and_does_not_match_sender_rules(sealbus):
    sub = open_dbus_connection(sealbus.address)
    sub.send_and_get_reply(message_bus.AddMatch(MatchRule(type="signal", interface="org.x.Spoof")))
    sub.send_and_get_reply(message_bus.AddMatch(MatchRule(type="signal", sender="org.freedesktop.DBus",
                                                          interface="org.x.Trusted")))  # fmt: skip
    liar = connected(sealbus)
    liar.send_raw(build_message(4, liar.next_serial(), path="/", interface="org.x.Trusted", member="T",
                                sender="org.freedesktop.DBus"))  # fmt: skip
    liar.send_raw(build_message(4, liar.next_serial(), path="/", interface="org.x.Spoof", member="S",
                                sender="org.freedesktop.DBus"))  # fmt: skip
    m = sub.receive(timeout=10)
    while m.header.fields.get(HeaderFields.interface) not in ("org.x.Spoof", "org.x.Trusted"):
        m = sub.receive(timeout=10)  # skip the bus's own NameOwnerChanged etc.
    fields = {f.value: v for f, v in m.header.fields.items()}
    assert fields[2] == "org.x.Spoof", "a forged SENDER matched a sender='org.freedesktop.DBus' rule"
    assert fields[7] == liar.unique_name


def test_fd_flood_disconnects_and_leaks_nothing(sealbus):
    base = sealbus.fd_count()
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(250)]
    try:
        for _ in range(3):  # more fds in one message than max_message_unix_fds
            c = connected(sealbus)
            msg = build_message(1, c.next_serial(), path="/", member="M", destination="org.x.Y", signature="h" * 250,
                                body=tuple(range(250)), unix_fds=250)  # fmt: skip
            try:
                c.send_raw(msg, fds)
            except OSError:
                pass
            assert c.closed_by_peer()
            c.close()
        # fds without having negotiated fd passing
        c = RawClient(sealbus)
        c.authenticate(fds=False)
        c.hello()
        c.send_raw(build_message(1, c.next_serial(), path="/", member="M", destination="org.x.Y", signature="h",
                                 body=(0,), unix_fds=1), fds[:1])  # fmt: skip
        assert c.closed_by_peer()
        c.close()
        # many fds queued towards a reader that never reads: bounded per receiver
        stuck = connected(sealbus)
        stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        flooder = connected(sealbus)
        for _ in range(1500):  # 24000 fds (more than the broker's RLIMIT_NOFILE) against 4096 per connection
            flooder.send_raw(build_message(4, flooder.next_serial(), path="/", interface="org.x.I", member="F",
                                           destination=stuck.unique_name, signature="h" * 16,
                                           body=tuple(range(16)), unix_fds=16), fds[:16])  # fmt: skip
        assert wait_until(lambda: sealbus.fd_count() < base + 4200)
        assert stuck.closed_by_peer(), sealbus.log_path.read_text()[-2000:]
        assert "max_outgoing_unix_fds" in sealbus.log_path.read_text()
        flooder.close()
        stuck.close()
    finally:
        for fd in fds:
            os.close(fd)
    assert_fds_back_and_alive(sealbus, base)


def test_slow_reader_does_not_stall_others(sealbus_factory, tmp_path):
    conf = tmp_path / "small.conf"
    conf.write_text("""<busconfig><type>session</type><policy context="default">
      <allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/><allow own="*"/></policy>
      <limit name="max_outgoing_bytes">200000</limit></busconfig>""")
    bus = sealbus_factory("--config", str(conf))
    stuck = connected(bus)
    stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.reply_to(stuck.call("AddMatch", "s", ("type='signal',interface='org.x.Flood'",)))
    stuck.reply_to(stuck.call("RequestName", "su", ("org.x.Stuck", 0)))
    # from here on `stuck` never reads again
    flooder = open_dbus_connection(bus.address)
    other = open_dbus_connection(bus.address)
    payload = "x" * 4000
    worst = 0.0
    for i in range(400):
        flooder.send(new_signal(DBusAddress("/", interface="org.x.Flood"), "F", "s", (payload,)))
        if i % 20 == 0:
            t = time.monotonic()
            other.send_and_get_reply(message_bus.GetId(), timeout=10)
            worst = max(worst, time.monotonic() - t)
    assert worst < 1.0, f"a bystander waited {worst:.2f}s"
    assert stuck.closed_by_peer()  # the reader that never reads was disconnected
    log = bus.log_path.read_text()
    assert "cannot take its signals" in log and "uid=" in log and "pid=" in log


def test_calls_to_a_stuck_service_get_limits_exceeded(sealbus_factory, tmp_path):
    conf = tmp_path / "small.conf"
    conf.write_text("""<busconfig><type>session</type><policy context="default">
      <allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/><allow own="*"/></policy>
      <limit name="max_outgoing_bytes">100000</limit></busconfig>""")
    bus = sealbus_factory("--config", str(conf))
    stuck = connected(bus)
    stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    caller = connected(bus)
    caller.sock.settimeout(10)
    errors = []
    for _ in range(200):
        s = caller.call("Do", "s", ("y" * 4000,), dest=stuck.unique_name, path="/", interface="org.x.I")
        caller.sock.setblocking(False)
        try:
            while True:
                errors.append(describe_msg(caller.recv())[1])
        except (BlockingIOError, TimeoutError):
            pass
        caller.sock.settimeout(10)
        if errors:
            break
    else:
        errors += [describe_msg(m)[1] for m in caller.reply_to(s)]
    assert "org.freedesktop.DBus.Error.LimitsExceeded" in errors
    # the caller is not punished, the callee is not dropped, others still work
    assert describe_msg(caller.reply_to(caller.call("GetId"))[-1])[0] == "method_return"
    assert bus_is_alive(bus)
    stuck.sock.setblocking(True)
    assert stuck.recv()  # the queued calls are still there for it


def test_connection_flood_from_one_uid(sealbus_factory, tmp_path, test_users):
    u1, u2 = test_users
    conf = tmp_path / "conn.conf"
    conf.write_text("""<busconfig><type>system</type><policy context="default"><allow user="*"/>
      <allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/><allow own="*"/></policy>
      <limit name="max_connections_per_user">5</limit></busconfig>""")
    bus = sealbus_factory("--config", str(conf))
    script = f"""
from jeepney.io.blocking import open_dbus_connection
conns, refused = [], 0
for i in range(N):
    try:
        conns.append(open_dbus_connection({bus.address!r}))
    except Exception:
        refused += 1
print(len(conns), refused)
"""
    out = run_as(u1, [sys.executable, "-c", script.replace("N", "8")])
    ok, refused = map(int, out.stdout.split())
    assert ok == 5 and refused == 3, out.stderr
    out = run_as(u2, [sys.executable, "-c", script.replace("N", "2")])
    assert out.stdout.split() == ["2", "0"], out.stderr  # another uid is unaffected
    assert "max_connections_per_user" in bus.log_path.read_text()
    ensure_test_users()


BAD_BODIES = {
    "invalid UTF-8 in a string": ("s", lambda e: (b"\2\0\0\0" if e == "l" else b"\0\0\0\2") + b"\xc3\x28\0"),
    "boolean of 2": ("b", lambda e: b"\2\0\0\0" if e == "l" else b"\0\0\0\2"),
    "100 nested variants": ("v", lambda e: b"\1v\0" * 100 + b"\1y\0\x2a"),
}  # fmt: skip


@pytest.mark.parametrize("endian", "lB")
@pytest.mark.parametrize("kind", sorted(BAD_BODIES))
def test_malformed_body_disconnects_the_sender_and_never_reaches_the_receiver(sealbus, kind, endian):
    from broker.wire.message import encode_header

    receiver = connected(sealbus)
    sender = connected(sealbus)
    sig, body = BAD_BODIES[kind]
    body = body(endian)
    sender.send_raw(encode_header(endian, 1, 0, len(body), sender.next_serial(), path="/x", interface="org.x.I",
                                  member="Bad", destination=receiver.unique_name, signature=sig) + body)  # fmt: skip
    assert sender.closed_by_peer()
    assert "protocol violation" in sealbus.log_path.read_text()
    # Anything the sender got through would reach the receiver before this marker from a third client.
    other = connected(sealbus)
    other.send_raw(build_message(4, other.next_serial(), path="/", interface="org.x.Marker", member="Marker",
                                 destination=receiver.unique_name))  # fmt: skip
    got = receiver.until(lambda m: describe_msg(m)[1] == "Marker")
    assert [describe_msg(m)[:2] for m in got] == [("signal", "Marker")], got
    serial = receiver.call("GetId")  # and the receiver is still connected
    assert describe_msg(receiver.reply_to(serial)[-1])[0] == "method_return"
    assert bus_is_alive(sealbus)
