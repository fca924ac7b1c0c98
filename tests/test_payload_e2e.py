"""Sealed memfd payloads through a live sealbus: zero copy, multicast, refusals."""

import fcntl
import hashlib
import mmap
import os

import pytest
from jeepney import DBusAddress, MatchRule, MessageType, message_bus, new_method_call, new_method_return, new_signal
from jeepney.io.blocking import open_dbus_connection

from broker.client.memfd import MappedForWrite, apply_seals, memfd_create, open_payload, seal
from broker.payload.seals import get_seals

# Protocol constants pinned here (the kernel's <linux/fcntl.h>, kdbus's four seals), not imported
# from the implementation: a wrong value there must fail these tests, not move them along.
F_ADD_SEALS = 1033
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 0x1, 0x2, 0x4, 0x8
F_SEAL_FUTURE_WRITE, F_SEAL_EXEC = 0x10, 0x20
PAYLOAD_SEALS = 0xF  # SHRINK | GROW | WRITE | SEAL

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


# -- refusals in every mode, through the bus ---------------------------------------------------


def _grab_bus_listening_socket(bus) -> int:
    """A copy of the bus's own listening socket, taken from the bus process with pidfd_getfd
    (as a client could get it if the bus socket were ever inherited or leaked)."""
    import ctypes
    import socket

    inodes = set()
    with open("/proc/net/unix") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if len(parts) >= 8 and parts[7] == str(bus.path) and parts[5] == "01":  # SS_UNCONNECTED: listening
                inodes.add(parts[6])
    for n in os.listdir(f"/proc/{bus.pid}/fd"):
        try:
            link = os.readlink(f"/proc/{bus.pid}/fd/{n}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            pidfd = os.pidfd_open(bus.pid)
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.syscall(438, pidfd, int(n), 0)  # pidfd_getfd
            os.close(pidfd)
            if fd < 0:
                pytest.skip(f"pidfd_getfd: {os.strerror(ctypes.get_errno())}")
            s = socket.socket(fileno=fd)
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            return s.detach()
    raise AssertionError("listening socket of the bus not found")


@pytest.mark.root
@pytest.mark.parametrize("mode", ["any", "sealed"])
def test_bus_listening_socket_refused(sealbus_factory, mode):
    if os.geteuid() != 0:
        pytest.skip("pidfd_getfd on the bus process needs root (ptrace)")
    bus = sealbus_factory("--fd-mode", mode)
    service, client = connect(bus), connect(bus)
    service.send_and_get_reply(message_bus.RequestName("org.sealbus.Sink"))
    lfd = _grab_bus_listening_socket(bus)
    reply = call(client, "org.sealbus.Sink", "Take", "h", (lfd,))
    os.close(lfd)
    assert reply.header.fields[4] == "org.sealbus.Error.FdRefused"
    assert "listening socket" in reply.body[0]
    assert client.send_and_get_reply(message_bus.GetId(), timeout=30).header.message_type == MessageType.method_return


def test_unix_socket_with_fds_in_flight_refused_in_any_mode(sealbus):
    import array
    import socket

    service, client = connect(sealbus), connect(sealbus)
    service.send_and_get_reply(message_bus.RequestName("org.sealbus.Sink"))
    a, b = socket.socketpair()
    # b carries, in flight, the sender's own connection to the bus: the loop the rule prevents
    a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [client.sock.fileno()]))])
    reply = call(client, "org.sealbus.Sink", "Take", "h", (b.fileno(),))
    assert reply.header.fields[4] == "org.sealbus.Error.FdRefused"
    assert "fd #0" in reply.body[0] and "in flight" in reply.body[0]
    # an empty socketpair end is fine in `any` mode (dbus-daemon compatible) and the sender goes on
    c, d = socket.socketpair()
    client.send(
        new_method_call(DBusAddress("/t", bus_name="org.sealbus.Sink", interface=IFACE), "Take", "h", (d.fileno(),))
    )
    m = recv_call(service)
    with socket.socket(fileno=m.body[0].to_raw_fd()) as got:
        c.sendall(b"ping")
        assert got.recv(4) == b"ping"
    for s in (a, b, c, d):
        s.close()


def test_connection_to_the_bus_refused(sealbus):
    import socket

    service, client = connect(sealbus), connect(sealbus)
    service.send_and_get_reply(message_bus.RequestName("org.sealbus.Sink"))
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(str(sealbus.path))  # a fresh connection: nothing queued yet, so only the peer rule applies
    reply = call(client, "org.sealbus.Sink", "Take", "h", (raw.fileno(),))
    assert reply.header.fields[4] == "org.sealbus.Error.FdRefused"
    assert "connection to this bus" in reply.body[0]
    raw.close()


def test_debug_stats_count_payloads_and_refusals(sealed_bus):
    service, client = connect(sealed_bus), connect(sealed_bus)
    service.send_and_get_reply(message_bus.RequestName("org.sealbus.Sink"))
    fd = seal(b"s" * 10000)
    client.send(new_method_call(DBusAddress("/t", bus_name="org.sealbus.Sink", interface=IFACE), "Take", "h", (fd,)))
    recv_call(service)
    call(client, "org.sealbus.Sink", "Take", "h", (_memfd_with(0),))
    stats = call(client, "org.freedesktop.DBus", "GetStats")
    if stats.header.message_type == MessageType.error:  # jeepney: GetStats lives on Debug.Stats
        stats = client.send_and_get_reply(new_method_call(
            DBusAddress("/org/freedesktop/DBus", bus_name="org.freedesktop.DBus",
                        interface="org.freedesktop.DBus.Debug.Stats"), "GetStats"), timeout=30)  # fmt: skip
    d = {k: v[1] for k, v in stats.body[0].items()}
    assert d["sealbus.payload.payloads_forwarded"] >= 1
    assert d["sealbus.payload.bytes_without_copy"] >= 10000
    assert d["sealbus.payload.refused_unsealed"] >= 1


# -- the CLI at a shell ------------------------------------------------------------------------


def test_cli_send_receive_cat(sealed_bus, tmp_path):
    import re
    import subprocess
    import sys

    sealbus_cmd = os.path.join(os.path.dirname(sys.executable), "sealbus")
    src = tmp_path / "big"
    data = os.urandom(MiB) * 20
    src.write_bytes(data)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    recv = subprocess.Popen([sealbus_cmd, "receive", "--address", sealed_bus.address, "--name", "org.sealbus.Cli",
                             "--count", "1", "--out", str(out_dir)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert recv.stdout.readline().startswith("listening as ")
        sent = subprocess.run([sealbus_cmd, "send", "--address", sealed_bus.address, "--dest", "org.sealbus.Cli",
                               "--path", "/t", "--interface", IFACE, "--member", "Take", "--payload", str(src),
                               "--progress"], capture_output=True, text=True, timeout=60)  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        assert "20/20 MiB" in sent.stderr  # progress on stderr
        out, _ = recv.communicate(timeout=30)
    finally:
        recv.kill()
    sender_ino = re.search(r"dev=(\d+) ino=(\d+)", sent.stdout).groups()
    assert re.search(r"dev=(\d+) ino=(\d+)", out).groups() == sender_ino  # the receiver saw the sender's inode
    assert f"sha256={hashlib.sha256(data).hexdigest()}" in out
    assert "seals=SEAL|SHRINK|GROW|WRITE" in out
    assert (out_dir / "payload-1.bin").read_bytes() == data
    fd = seal(data)
    cat = subprocess.run([sealbus_cmd, "cat-payload"], stdin=fd, capture_output=True, timeout=30)
    assert cat.returncode == 0 and cat.stdout == data
    unsealed = _memfd_with(0)
    cat = subprocess.run([sealbus_cmd, "cat-payload"], stdin=unsealed, capture_output=True, timeout=30)
    assert cat.returncode == 1 and b"lacks seals" in cat.stderr


# -- a client's own FUSE mount must not stall the bus ------------------------------------------


@pytest.mark.root
@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["any", "sealed"])
def test_fd_from_hostile_fuse_mount_does_not_stall_the_bus(sealbus_factory, hostile_fuse, mode):
    bus = sealbus_factory("--fd-mode", mode)
    service, client = connect(bus), connect(bus)
    service.send_and_get_reply(message_bus.RequestName("org.sealbus.Sink"))
    fuse_fd = os.open(hostile_fuse / "f", os.O_RDONLY)  # not closed here: the fixture's teardown frees it
    client.send(
        new_method_call(DBusAddress("/t", bus_name="org.sealbus.Sink", interface=IFACE), "Take", "h", (fuse_fd,))
    )
    if mode == "any":
        m = recv_call(service)
        m.body[0].to_raw_fd()  # the receiver keeps it too; the broker's own copy is the one closed
    # the bus must still serve everybody else
    try:
        other = open_dbus_connection(bus.address, auth_timeout=5)
        reply = other.send_and_get_reply(message_bus.GetId(), timeout=5)
    except TimeoutError:
        pytest.fail("the bus stalled closing a FUSE file a client passed")
    assert reply.header.message_type == MessageType.method_return


@pytest.fixture
def hostile_fuse(tmp_path):
    """A FUSE mount whose server never answers FLUSH (so close() of its file blocks until teardown)."""
    from tests import hostile_fuse as hf

    if os.geteuid() != 0:
        pytest.skip("mounting FUSE needs root here")
    (tmp_path / "hostile").mkdir()
    with hf.mount(tmp_path / "hostile") as mnt:
        yield mnt
