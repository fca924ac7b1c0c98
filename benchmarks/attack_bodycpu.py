"""Attack (not a test): one client's dense message body holds the broker's CPU.

    .venv/bin/python -m benchmarks.attack_bodycpu [--sealbus-cmd CMD] [--kinds ag,as,...] [TARGET ...]

A receiver reads everything (in a thread); an attacker sends it one message of
``max_message_size`` (32 MiB) whose body is as dense as D-Bus allows: ``ag``
of empty signatures, ``as`` of empty strings, ``av`` of one-byte variants,
``aay`` of empty arrays, ``o`` one object path of 32 MiB (``ay`` for
comparison: length-only). Meanwhile another
client does Ping round trips to the bus driver without pause. Printed: the
longest Ping round trip seen from the moment the attacker starts sending until
the receiver has the whole message, the number of pings in that window, and the
time the message took through the broker (sending start to received whole).

A broker that validates the whole body on its only thread answers no Ping for
as long as the check takes. Brokers are started as benchmarks/attack_pinned.py
starts them, with their limits but a
queue that holds the message. Results go to docs/attacks.md by hand.
"""

import struct
import threading
import time

from benchmarks import attack_pinned
from benchmarks.attack_pinned import Client, print_row, target_args
from broker.wire.message import encode_header

MiB = 1 << 20
# attack_pinned's limits (32 MiB messages: the system bus's), with room to queue one whole message
LIMITS = dict(attack_pinned.LIMITS, max_outgoing_bytes=32 * MiB)  # dbus-broker refuses 64 MiB
SEALBUS_LIMITS = dict(attack_pinned.SEALBUS_LIMITS, max_outgoing_bytes_per_user=64 * MiB)
SIZE = LIMITS["max_message_size"] - 4096  # the whole message stays under the limit


def dense_body(kind: str, size: int) -> bytes:
    if kind == "ag":
        elems = bytes(size // 2 * 2)  # empty signatures: length 0, NUL
    elif kind == "as":
        elems = bytes(size // 8 * 8 - 3)  # empty strings: length 0, NUL, padding to the next
    elif kind == "av":
        elems = b"\1y\0\7" * (size // 4)  # variants holding one byte
    elif kind == "aay":
        elems = bytes(size // 4 * 4)  # empty byte arrays
    elif kind == "ay":
        elems = bytes(size)
    elif kind == "o":  # one object path: a single value, which no step can split
        path = b"/a" * (size // 2 - 1)
        return struct.pack("<I", len(path)) + path + b"\0"
    else:
        raise ValueError(kind)
    return struct.pack("<I", len(elems)) + elems


class Receiver(threading.Thread):
    """Reads the socket until ``want`` bytes came; ``done_at`` is when."""

    def __init__(self, client: Client, want: int):
        super().__init__(daemon=True)
        self.client = client
        self.want = want
        self.done_at = None

    def run(self) -> None:
        got = 0
        self.client.sock.settimeout(120)
        while got < self.want:
            chunk = self.client.sock.recv(1 << 20)
            if not chunk:
                return
            got += len(chunk)
        self.done_at = time.monotonic()


def ping(c: Client) -> None:
    c.serial += 1
    serial = c.serial
    c.sock.sendall(encode_header("l", 1, 0, 0, serial, path="/org/freedesktop/DBus", member="Ping",
                                 interface="org.freedesktop.DBus.Peer",
                                 destination="org.freedesktop.DBus"))  # fmt: skip
    c.reply_to(serial)


def attack(path: str, kind: str) -> dict:
    receiver = Client(path)
    attacker = Client(path)
    pinger = Client(path)
    body = dense_body(kind, SIZE)
    attacker.serial += 1
    raw = encode_header("l", 1, 1, len(body), attacker.serial, path="/a", interface="org.x.Cpu", member="Dense",
                        destination=receiver.unique_name, signature=kind) + body  # fmt: skip
    for _ in range(50):
        ping(pinger)  # warm
    rx = Receiver(receiver, len(body))
    rx.start()
    t0 = time.monotonic()
    tx = threading.Thread(target=attacker.sock.sendall, args=(raw,), daemon=True)
    tx.start()
    worst = worst_at = 0.0
    n = 0
    rtts = []
    deadline = t0 + 120
    while rx.is_alive() and time.monotonic() < deadline:
        s = time.monotonic()
        ping(pinger)
        e = time.monotonic()
        rtts.append(e - s)
        if e - s > worst:
            worst, worst_at = e - s, s - t0
        n += 1
    rx.join(1)
    tx.join(1)
    transit = (rx.done_at - t0) if rx.done_at else float("nan")
    for c in (receiver, attacker, pinger):
        c.close()
    rtts.sort()
    median = rtts[len(rtts) // 2] if rtts else float("nan")
    return {
        "worst_ms": worst * 1000,
        "worst_at_s": worst_at,
        "median_ms": median * 1000,
        "pings": n,
        "transit_s": transit,
    }


def _row(r: dict) -> str:
    return (f"{r['worst_ms']:>10.1f} ms {r['worst_at_s']:>8.2f} s {r['median_ms']:>6.2f} ms {r['pings']:>7} "
            f"{r['transit_s']:>14.2f} s")  # fmt: skip


def main() -> None:
    ap = target_args(__doc__)
    ap.add_argument("--kinds", default="ag,as,av,aay,ay")
    args = ap.parse_args()
    attack_pinned.LIMITS, attack_pinned.SEALBUS_LIMITS = LIMITS, SEALBUS_LIMITS  # what start() writes
    print(f"limits: {LIMITS}; one {SIZE / MiB:.1f} MiB dense body to a reading receiver, Pings meanwhile")
    print(
        f"{'broker':<12} {'body':>5} {'longest Ping':>13} {'(sent at)':>10} {'median':>9} {'pings':>7} "
        f"{'message transit':>16}"
    )
    for kind in args.targets:
        for body_kind in args.kinds.split(","):
            print_row(kind, f"{body_kind:>5}", "attack-bodycpu.", args.sealbus_cmd,
                      lambda _pid, sock, body_kind=body_kind: _row(attack(sock, body_kind)))  # fmt: skip


if __name__ == "__main__":
    main()
