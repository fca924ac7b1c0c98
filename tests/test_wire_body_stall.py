"""A real broker: validating one client's large dense body never holds the loop. Client A sends a
32 MiB body of 16 Mi empty signatures (the slowest body to check per byte: seconds of pure Python);
client B's Ping round trips are answered while it is still being validated, i.e. before the
receiver gets any byte of it. Structural, no timing: on a loop that checks the whole body at once,
the receiver's copy is queued (and partly written) before B's next Ping is even read."""

import array
import os
import select
import socket
import struct

from broker.wire.message import encode_header

from .conftest import RawClient
from .test_adversarial import wait_until

MiB = 1024 * 1024
NO_REPLY_EXPECTED = 1


def connected(bus) -> RawClient:
    c = RawClient(bus, timeout=60)
    assert c.authenticate().startswith(b"OK ")
    c.hello()
    return c


def dense_ag(size: int) -> bytes:
    n = size // 2
    return struct.pack("<I", 2 * n) + bytes(2 * n)  # n empty signatures


def raw_message(dest: str, serial: int, signature: str, body: bytes) -> bytes:
    return encode_header("l", 1, NO_REPLY_EXPECTED, len(body), serial, path="/x", interface="org.x.I",
                         member="Big", destination=dest, signature=signature) + body  # fmt: skip


def recv_exactly(sock, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(n - len(out), 1 << 20))
        assert chunk, "the bus closed the connection"
        out += chunk
    return bytes(out)


def read_one_raw(sock) -> tuple[bytes, bytes]:
    """(header, body) of the next message, read as bytes (parsing 16 Mi signatures in Python is slow)."""
    fixed = recv_exactly(sock, 16)
    body_len, _serial, fields_len = struct.unpack_from("<III", fixed, 4)
    rest = recv_exactly(sock, fields_len + (-fields_len % 8) + body_len)
    return fixed + rest[: fields_len + (-fields_len % 8)], rest[fields_len + (-fields_len % 8) :]


def ping(c: RawClient) -> None:
    serial = c.call("Ping", path="/", interface="org.freedesktop.DBus.Peer")
    c.reply_to(serial)


def test_pings_are_answered_while_a_dense_body_is_validated(sealbus):
    receiver = connected(sealbus)
    a = connected(sealbus)
    b = connected(sealbus)
    body = dense_ag(32 * MiB - 4096)
    a.send_raw(raw_message(receiver.unique_name, a.next_serial(), "ag", body))  # fully written
    for _ in range(50):
        ping(b)
    # B was served 50 times, and the receiver has not got a byte of A's message yet: it was still
    # being validated (in steps, between B's round trips)
    assert select.select([receiver.sock], [], [], 0)[0] == []
    header, got = read_one_raw(receiver.sock)
    assert got == body  # then it arrives whole
    assert b"Big" in header
    ping(a)  # and A is still connected


def test_an_invalid_dense_body_disconnects_its_sender_only_and_reaches_nobody(sealbus):
    receiver = connected(sealbus)
    a = connected(sealbus)
    b = connected(sealbus)
    ping(b)
    base = sealbus.fd_count()
    elems = bytearray(16 * MiB)
    elems[-2:] = b"\1("  # the last signature is invalid: found by the last step
    elems += b"\0"
    body = struct.pack("<II", 0, len(elems)) + elems  # 'hag': an fd index, then the signatures
    raw = encode_header("l", 1, NO_REPLY_EXPECTED, len(body), a.next_serial(), path="/x", interface="org.x.I",
                        member="Big", destination=receiver.unique_name, signature="hag", unix_fds=1) + body  # fmt: skip
    fd = os.memfd_create("payload")
    sent = a.sock.sendmsg([raw[:4096]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    os.close(fd)
    a.sock.sendall(raw[sent:])
    for _ in range(20):
        ping(b)
    assert select.select([a.sock], [], [], 0)[0] == []  # B was served while A's body was being checked
    assert a.closed_by_peer(timeout=60)
    ping(b)
    ping(receiver)
    assert select.select([receiver.sock], [], [], 0)[0] == []  # nothing of A's message came
    # A's socket and the fd of its message are closed: the broker holds nothing of it
    assert wait_until(lambda: sealbus.fd_count() == base - 1), (sealbus.fd_count(), base)
