"""Micro-benchmark (not a test): one broker hop, in-process, warm caches.

    .venv/bin/python -m benchmarks.hop_micro

A hop is what the reactor does for one readable connection: ``recvmsg_into``,
frame, parse the header, route, then flush the receiver's outbox with
``sendmsg``. Here the real Server, Connection and Bus do it over socketpairs,
driven directly (no epoll, no other process), so the number is the broker's
own cost per message with hot caches; the syscall floor row is a bare
``sendmsg`` + ``recvmsg_into`` of the same size for comparison. In a live
run the broker pays more per hop (cold caches after every sleep, wake-ups of
the peer inside ``sendmsg``): compare with the broker CPU per call in
docs/benchmarks.md.

    .venv/bin/python -m benchmarks.hop_micro --cpu

counts the thread's CPU time instead of wall time (less sensitive to other
processes on a shared machine; the clock's own cost is subtracted). Which
build of the hot path ran (compiled or pure Python, see broker/__init__.py)
is named on the first row.
"""

import os
import socket
import sys
import time

import broker
from broker.bus.limits import Limits
from broker.bus.peer import Creds
from broker.bus.router import Bus
from broker.io.connection import Connection
from broker.io.server import Server
from broker.io.sysio import ANC_SPACE, MSG_CMSG_CLOEXEC
from broker.wire.framer import Framer
from broker.wire.message import build_message

DBUS = dict(path="/org/freedesktop/DBus", interface="org.freedesktop.DBus", destination="org.freedesktop.DBus")


def connect(server: Server) -> tuple[Connection, socket.socket]:
    """A real Connection of ``server``, already authenticated, over a socketpair: (connection, client end).

    The connection is registered with the bus and the reactor but has not sent Hello. Also used by
    tests/test_pinned_buffers.py.
    """
    bus = server.bus
    broker_end, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    broker_end.setblocking(False)
    client_end.setblocking(False)
    c = Connection(server, broker_end, Creds(os.getuid(), (os.getgid(),), os.getpid(), None))
    c.peer = bus.connect(c.creds)
    c.completed = True
    c.peer.wake = server.mark_dirty
    c.peer.kill = c._on_kill
    server.connections[c.peer] = c
    c.framer = Framer(bus.limits.max_message_size, bus.limits.max_message_unix_fds)
    server.reactor.add(c)
    return c, client_end


class Rig:
    """A bus with two authenticated connections whose client ends we hold."""

    def __init__(self):
        self.bus = Bus(Limits())
        self.server = Server(self.bus)
        self.bus.server = self.server
        self.client, self.client_end = self._connect()
        self.service, self.service_end = self._connect()
        self.round_trip(self.client, self.client_end, build_message(1, 1, member="Hello", **DBUS))
        self.round_trip(self.service, self.service_end, build_message(1, 1, member="Hello", **DBUS))
        self.round_trip(self.service, self.service_end, build_message(
            1, 2, member="RequestName", signature="su", body=("org.bench.Server", 0), **DBUS))  # fmt: skip

    def _connect(self):
        return connect(self.server)

    def hop(self, conn) -> None:
        """What the reactor does for one readable connection."""
        conn.on_readable()
        self.server.flush_dirty()

    def round_trip(self, conn, end, raw: bytes) -> None:
        end.send(raw)
        self.hop(conn)
        drain(end)


def drain(sock) -> int:
    try:
        return len(sock.recv(1 << 16))
    except BlockingIOError:
        return 0


def clock_cost(clock) -> int:
    """The least time one reading of ``clock`` adds to an interval, in its units."""
    return min(-clock() + clock() for _ in range(2000))


def hops(n: int = 10000, reps: int = 5, clock=time.perf_counter_ns) -> tuple[float, float]:
    rig = Rig()
    client_name = rig.client.peer.unique_name
    calls = [build_message(1, 10 + i, path="/org/bench/Server", interface="org.bench.Server", member="Ping",
                           destination="org.bench.Server", signature="ay", body=(b"x" * 16,))
             for i in range(n)]  # fmt: skip
    replies = [build_message(2, 10 + i, reply_serial=10 + i, destination=client_name, signature="ay",
                             body=(b"x" * 16,)) for i in range(n)]  # fmt: skip
    cost = clock_cost(clock)
    best_call = best_reply = float("inf")
    for _ in range(reps):
        t_call = t_reply = 0
        for call, reply in zip(calls, replies, strict=True):
            rig.client_end.send(call)
            t0 = clock()
            rig.hop(rig.client)
            t1 = clock()
            drain(rig.service_end)
            rig.service_end.send(reply)
            t2 = clock()
            rig.hop(rig.service)
            t3 = clock()
            drain(rig.client_end)
            t_call += t1 - t0
            t_reply += t3 - t2
        best_call = min(best_call, (t_call / n - cost) / 1000)
        best_reply = min(best_reply, (t_reply / n - cost) / 1000)
    return best_call, best_reply


def syscall_floor(n: int = 20000, size: int = 200) -> float:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    view = memoryview(bytearray(1 << 16))
    msg = b"x" * size
    clock = time.perf_counter_ns
    t = 0
    for _ in range(n):
        t0 = clock()
        b.sendmsg([msg])
        a.recvmsg_into([view], ANC_SPACE, MSG_CMSG_CLOEXEC)
        t += clock() - t0
    return t / n / 1000


def main() -> None:
    cpu = "--cpu" in sys.argv[1:]
    call, reply = hops(clock=time.thread_time_ns if cpu else time.perf_counter_ns)
    how = f"best of 5, {'CPU time, ' if cpu else ''}{broker.build()} build"
    print(f"{'call hop (client -> service)':32s} {call:8.2f} us  recv, parse, route, send ({how})")
    print(f"{'reply hop (service -> client)':32s} {reply:8.2f} us  recv, parse, reply tracking, send")
    print(f"{'syscall floor':32s} {syscall_floor():8.2f} us  sendmsg + recvmsg_into alone")


if __name__ == "__main__":
    main()
