"""Sealed memfd payloads through a live sealbus: zero copy, multicast, refusals."""

import fcntl
import hashlib
import mmap
import os

import pytest
from jeepney import DBusAddress, MatchRule, MessageType, message_bus, new_method_call, new_method_return, new_signal
from jeepney.io.blocking import open_dbus_connection

from broker.client.memfd import MappedForWrite, apply_seals, memfd_create, open_payload, seal
from broker.payload.seals import (
    F_ADD_SEALS,
    F_SEAL_FUTURE_WRITE,
    F_SEAL_GROW,
    F_SEAL_SEAL,
    F_SEAL_SHRINK,
    F_SEAL_WRITE,
    PAYLOAD_SEALS,
    get_seals,
)

MiB = 1 << 20
IFACE = "org.sealbus.Test"


def connect(bus):
    return open_dbus_connection(bus.address, enable_fds=True)


def call(conn, dest, member, sig="", body=()):
    msg = new_method_call(DBusAddress("/t", bus_name=dest, interface=IFACE), member, sig, body)
    return conn.send_and_get_reply(msg, timeout=30)


def recv_call(conn):
    while True:
        m = conn.receive(timeout=30)
        if m.header.message_type == MessageType.method_call and m.header.fields.get(3) != "Hello":
            return m


def big_payload():
    data = os.urandom(MiB) * 64
    return data, hashlib.sha256(data).hexdigest()


@pytest.fixture
def sealed_bus(sealbus_factory):
    return sealbus_factory("--fd-mode", "sealed")


def test_64mib_unicast_zero_copy(sealed_bus):
    data, digest = big_payload()
    fd = seal(data)
    del data
    st = os.fstat(fd)
    service, client = connect(sealed_bus), connect(sealed_bus)
    assert service.send_and_get_reply(message_bus.RequestName("org.sealbus.Sink")).body[0] == 1
    rss_before = sealed_bus.rss_kib()
    client.send(new_method_call(DBusAddress("/t", bus_name="org.sealbus.Sink", interface=IFACE), "Take", "h", (fd,)))
    m = recv_call(service)
    rfd = m.body[0].to_raw_fd()
    rst = os.fstat(rfd)
    assert (rst.st_dev, rst.st_ino) == (st.st_dev, st.st_ino)  # the very same file, not a copy
    assert get_seals(rfd) & PAYLOAD_SEALS == PAYLOAD_SEALS
    assert hashlib.sha256(open_payload(rfd)).hexdigest() == digest
    assert sealed_bus.rss_kib() - rss_before < 16 * 1024  # the broker never held the 64 MiB
    os.close(rfd)
    os.close(fd)


def test_64mib_broadcast_to_50_subscribers(sealed_bus):
    data, digest = big_payload()
    fd = seal(data)
    del data
    st = os.fstat(fd)
    subs = []
    for _ in range(50):
        c = connect(sealed_bus)
        c.send_and_get_reply(message_bus.AddMatch(MatchRule(type="signal", interface=IFACE, member="Blob")))
        subs.append(c)
    sender = connect(sealed_bus)
    rss_before = sealed_bus.rss_kib()
    sender.send(new_signal(DBusAddress("/t", interface=IFACE), "Blob", "h", (fd,)))
    digests = set()
    for c in subs:
        while True:
            m = c.receive(timeout=30)
            if m.header.fields.get(3) == "Blob":
                break
        rfd = m.body[0].to_raw_fd()
        rst = os.fstat(rfd)
        assert (rst.st_dev, rst.st_ino) == (st.st_dev, st.st_ino)
        digests.add(hashlib.sha256(open_payload(rfd)).hexdigest())
        os.close(rfd)
    assert digests == {digest}
    assert sealed_bus.rss_kib() - rss_before < 16 * 1024
    os.close(fd)


def _memfd_with(seals: int) -> int:
    fd = memfd_create("t")
    os.write(fd, b"payload")
    if seals:
        fcntl.fcntl(fd, F_ADD_SEALS, seals)
    return fd


REFUSALS = {
    "unsealed memfd": (lambda tmp: _memfd_with(0), "org.sealbus.Error.UnsealedPayload"),
    "no SHRINK": (lambda tmp: _memfd_with(PAYLOAD_SEALS & ~F_SEAL_SHRINK), "org.sealbus.Error.UnsealedPayload"),
    "no GROW": (lambda tmp: _memfd_with(PAYLOAD_SEALS & ~F_SEAL_GROW), "org.sealbus.Error.UnsealedPayload"),
    "no WRITE": (lambda tmp: _memfd_with(PAYLOAD_SEALS & ~F_SEAL_WRITE), "org.sealbus.Error.UnsealedPayload"),
    "no SEAL": (lambda tmp: _memfd_with(PAYLOAD_SEALS & ~F_SEAL_SEAL), "org.sealbus.Error.UnsealedPayload"),
    "FUTURE_WRITE instead of WRITE": (
        lambda tmp: _memfd_with(F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL),
        "org.sealbus.Error.UnsealedPayload",
    ),
    "regular writable file": (
        lambda tmp: os.open(tmp / "f", os.O_RDWR | os.O_CREAT, 0o600), "org.sealbus.Error.UnsealedPayload"),
    "pipe": (lambda tmp: os.pipe()[0], "org.sealbus.Error.FdRefused"),
    "directory": (lambda tmp: os.open(tmp, os.O_RDONLY | os.O_DIRECTORY), "org.sealbus.Error.FdRefused"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSALS))
def test_sealed_mode_refusals(sealed_bus, tmp_path, case):
    make, error = REFUSALS[case]
    service, client = connect(sealed_bus), connect(sealed_bus)
    service.send_and_get_reply(message_bus.RequestName("org.sealbus.Sink"))
    fd = make(tmp_path)
    reply = call(client, "org.sealbus.Sink", "Take", "h", (fd,))
    assert reply.header.message_type == MessageType.error
    assert reply.header.fields[4] == error
    assert "fd #0" in reply.body[0]
    # the sender stays connected and can go on sending
    good = seal(b"fine")
    client.send(new_method_call(DBusAddress("/t", bus_name="org.sealbus.Sink", interface=IFACE), "Take", "h", (good,)))
    m = recv_call(service)
    assert bytes(open_payload(m.body[0].to_raw_fd())) == b"fine"
    service.send(new_method_return(m))


def test_any_mode_still_refuses_directories(sealbus, tmp_path):
    service, client = connect(sealbus), connect(sealbus)
    service.send_and_get_reply(message_bus.RequestName("org.sealbus.Sink"))
    reply = call(client, "org.sealbus.Sink", "Take", "h", (os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY),))
    assert reply.header.fields[4] == "org.sealbus.Error.FdRefused"
    r, w = os.pipe()
    client.send(new_method_call(DBusAddress("/t", bus_name="org.sealbus.Sink", interface=IFACE), "Take", "h", (r,)))
    m = recv_call(service)  # a pipe is fine in `any` mode (dbus-daemon compatible)
    assert m.body[0].to_raw_fd() >= 0


def test_none_mode_refuses_every_fd(sealbus_factory):
    bus = sealbus_factory("--fd-mode", "none")
    service, client = connect(bus), connect(bus)
    service.send_and_get_reply(message_bus.RequestName("org.sealbus.Sink"))
    reply = call(client, "org.sealbus.Sink", "Take", "h", (seal(b"x"),))
    assert reply.header.fields[4] == "org.sealbus.Error.FdRefused"


def test_writable_mapping_blocks_seal_write():
    fd = memfd_create("t")
    os.ftruncate(fd, 4096)
    m = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    m[:5] = b"hello"
    with pytest.raises(MappedForWrite):
        apply_seals(fd)
    m.close()
    apply_seals(fd)  # after unmapping, sealing works
    assert get_seals(fd) & PAYLOAD_SEALS == PAYLOAD_SEALS
    assert bytes(open_payload(fd)[:5]) == b"hello"


def test_open_payload_refuses_unsealed_unless_asked():
    fd = _memfd_with(0)
    from broker.client.memfd import PayloadError

    with pytest.raises(PayloadError):
        open_payload(fd)
    assert bytes(open_payload(fd, allow_unsealed=True)) == b"payload"


def test_seal_from_iterator_and_file(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"abc" * 1000)
    assert bytes(open_payload(seal(p))) == b"abc" * 1000
    with open(p, "rb") as f:
        assert bytes(open_payload(seal(f))) == b"abc" * 1000
    assert bytes(open_payload(seal(iter([b"a", b"b", b"c"])))) == b"abc"
