"""Cleanup attacks (hardening classes 5 and 6): how long one client's disconnect stalls the bus.

    .venv/bin/python -m benchmarks.attack_cleanup [--quick] [--before SRC_DIR] [--md FILE]

Each scenario runs against sealbus (``.venv/bin/sealbus run --config F``),
dbus-daemon and dbus-broker (via ./dbus-broker-wrap) in the same run, each a
fresh bus started with the same config: system-bus-like limits (dbus-daemon's
system.conf defaults: 512 match rules and 128 pending replies per
connection, 256 connections per user, 2048 connections). ``--before DIR``
adds sealbus run from another source tree (e.g. a ``git archive`` of an
older commit), for before/after numbers.

The stall is the longest round trip of ``org.freedesktop.DBus.Peer.Ping`` to
the bus that a bystander client, pinging back to back, sees from just before
the attacker disconnects until the bus has answered a ping sent after the
disconnect (plus 0.3 s); ``idle`` is the same client's longest round trip
over 0.5 s before the attack.

Scenarios (each repeated, the worst repetition reported):

matches-iface   250 connections x 512 rules ``type='signal',interface='org.attack.C<c>.I<i>'`` (no
                member); then one connection adds 512 such rules and disconnects.
matches-arg0    the same with rules that name no header field (``type='signal',arg0='c<c>x<i>'``):
                no bus can index these by header, every signal is matched against them all.
replies         100 callers x 100 calls to one service that never answers (10,000 pending replies),
                then the service disconnects: 10,000 NoReply errors.
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

from jeepney.low_level import Parser

from broker.wire.message import build_message

from .rawauth import read_line
from .run_bench import BrokerInstance, DaemonInstance, bus_config, kill_tree, readline_timeout, wait_bus

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SYSTEM_LIMITS = {
    "max_match_rules_per_connection": 512,
    "max_replies_per_connection": 128,
    "max_connections_per_user": 256,
    "max_completed_connections": 2048,
}
DBUS = dict(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus", interface="org.freedesktop.DBus")


# ---------------------------------------------------------------- a minimal pipelining client


class Conn:
    """A raw D-Bus connection that can pipeline many calls and count their replies."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n")
        line = read_line(self.sock)
        if not line.startswith(b"OK"):
            raise ConnectionError(f"authentication refused: {line!r}")
        self.sock.sendall(b"BEGIN\r\n")
        self.parser = Parser()
        self.serial = 0
        self.pending = []
        self.name = self.call_wait([self.msg(**DBUS, member="Hello")])[0].body[0]

    def msg(self, *, t: int = 1, signature: str = "", body: tuple = (), flags: int = 0, **fields) -> bytes:
        self.serial += 1
        return build_message(t, self.serial, signature=signature, body=body, flags=flags, **fields)

    def recv_messages(self, timeout: float | None = None) -> list:
        self.sock.settimeout(timeout)
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("bus closed the connection")
        self.parser.add_data(data)
        out = []
        while (m := self.parser.get_next_message()) is not None:
            out.append(m)
        return out

    def call_wait(self, msgs: list[bytes]) -> list:
        """Send ``msgs`` (method calls) in one write; return their replies (errors included)."""
        first = self.serial - len(msgs) + 1
        want = set(range(first, self.serial + 1))
        self.sock.sendall(b"".join(msgs))
        replies = []
        while want:
            for m in self.pending + self.recv_messages(60):
                rs = m.header.fields.get(5)  # REPLY_SERIAL
                if rs in want:
                    want.discard(rs)
                    replies.append(m)
            self.pending = []
        return replies

    def close(self) -> None:
        self.sock.close()


def add_rules(conn: Conn, texts: list[str]) -> int:
    """AddMatch each rule (pipelined); returns how many the bus refused."""
    msgs = [conn.msg(**DBUS, member="AddMatch", signature="s", body=(t,)) for t in texts]
    return sum(m.header.message_type.value == 3 for m in conn.call_wait(msgs))


class Pinger(threading.Thread):
    """Pings the bus back to back and records (send time, round trip)."""

    def __init__(self, path: str):
        super().__init__(daemon=True)
        self.conn = Conn(path)
        self.samples: list[tuple[float, float]] = []
        self.stop = False

    def run(self) -> None:
        c = self.conn
        while not self.stop:
            raw = c.msg(destination="org.freedesktop.DBus", path="/", interface="org.freedesktop.DBus.Peer",
                        member="Ping")  # fmt: skip
            serial = c.serial
            t0 = time.perf_counter()
            c.sock.sendall(raw)
            done = False
            while not done:
                for m in c.recv_messages(120):
                    if m.header.fields.get(5) == serial:
                        done = True
            self.samples.append((t0, time.perf_counter() - t0))
            time.sleep(0.0005)

    def worst_between(self, start: float, end: float) -> float:
        # a ping counts if it was in flight at any time in [start, end]
        return max((rtt for t0, rtt in self.samples if t0 <= end and t0 + rtt >= start), default=0.0)

    def answered_after(self, t: float) -> bool:
        return any(t0 >= t for t0, _ in self.samples)


def measure_stall(pinger: Pinger, trigger) -> tuple[float, float]:
    """(idle worst round trip, worst round trip around ``trigger()``), in seconds."""
    t_idle = time.perf_counter()
    time.sleep(0.5)
    idle = pinger.worst_between(t_idle, time.perf_counter())
    start = time.perf_counter()
    trigger()
    after = time.perf_counter()
    deadline = after + 120
    while not pinger.answered_after(after) and time.perf_counter() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    return idle, pinger.worst_between(start, time.perf_counter())


# ---------------------------------------------------------------- scenarios


def scenario_matches(path: str, kind: str, conns: int, rules: int, reps: int) -> dict:
    if kind == "iface":
        rule = "type='signal',interface='org.attack.C{c}.I{i}'"
    else:
        rule = "type='signal',arg0='c{c}x{i}'"
    holders, refused = [], 0
    t = time.perf_counter()
    for c in range(conns):
        h = Conn(path)
        refused += add_rules(h, [rule.format(c=c, i=i) for i in range(rules)])
        holders.append(h)
    setup = time.perf_counter() - t
    pinger = Pinger(path)
    pinger.start()
    stalls, idles = [], []
    for r in range(reps):
        leaver = Conn(path)
        refused_leaver = add_rules(leaver, [rule.format(c=f"L{r}", i=i) for i in range(rules)])
        refused += refused_leaver
        idle, stall = measure_stall(pinger, leaver.close)
        idles.append(idle)
        stalls.append(stall)
    pinger.stop = True
    pinger.join(120)
    for h in holders:
        h.close()
    return {"stall": max(stalls), "stalls": stalls, "idle": max(idles), "refused": refused, "setup": setup}


def scenario_replies(path: str, callers: int, calls: int, reps: int) -> dict:
    pinger = Pinger(path)
    pinger.start()
    stalls, idles, noreply = [], [], 0
    clients = [Conn(path) for _ in range(callers)]
    setup = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        svc = Conn(path)
        for c in clients:
            c.sock.sendall(b"".join(c.msg(destination=svc.name, path="/", interface="org.attack.I", member="Stall")
                                    for _ in range(calls)))  # fmt: skip
        got = 0
        while got < callers * calls:
            got += sum(m.header.message_type.value == 1 for m in svc.recv_messages(120))
        setup = max(setup, time.perf_counter() - t)
        idle, stall = measure_stall(pinger, svc.close)
        idles.append(idle)
        stalls.append(stall)
        for c in clients:  # read the NoReply errors, so the next repetition starts clean
            want = calls
            while want:
                for m in c.pending + c.recv_messages(120):
                    if m.header.message_type.value == 3:
                        want -= 1
                        noreply += 1
                c.pending = []
    pinger.stop = True
    pinger.join(120)
    for c in clients:
        c.close()
    return {"stall": max(stalls), "stalls": stalls, "idle": max(idles), "noreply": noreply, "setup": setup}


# ---------------------------------------------------------------- buses


class SealbusInstance:
    def __init__(self, wd: str, limits: dict, src: str | None = None):
        self.dir = tempfile.mkdtemp(prefix="sb.", dir=wd)
        sock = os.path.join(self.dir, "bus")
        conf = os.path.join(self.dir, "bus.conf")
        with open(conf, "w") as f:
            f.write(bus_config(sock, limits))
        env = dict(os.environ)
        if src is None:
            cmd = [os.path.join(ROOT, ".venv", "bin", "sealbus"), "run", "--config", conf]
        else:
            cmd = [sys.executable, "-m", "broker.cli", "run", "--config", conf]
            env["PYTHONPATH"] = src
        self.log = open(os.path.join(self.dir, "log"), "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, env=env,
                                     cwd=src or ROOT)  # fmt: skip
        if not readline_timeout(self.proc.stdout, 30):
            self.stop()
            raise RuntimeError("sealbus did not start")
        self.address = "unix:path=" + sock
        wait_bus(self.address, 30, self.proc)

    def stop(self) -> None:
        kill_tree(self.proc)


def start(kind: str, wd: str, before: str | None):
    if kind == "sealbus":
        return SealbusInstance(wd, SYSTEM_LIMITS)
    if kind == "sealbus (before)":
        return SealbusInstance(wd, SYSTEM_LIMITS, before)
    if kind == "dbus-daemon":
        return DaemonInstance(wd, SYSTEM_LIMITS, [])
    return BrokerInstance(wd, SYSTEM_LIMITS, [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller scale (50 connections, 1,000 pending calls)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--before", metavar="SRC_DIR", help="also run sealbus from this source tree")
    ap.add_argument("--only", help="comma-separated scenario names")
    ap.add_argument("--md", help="write the table (markdown) to this file")
    args = ap.parse_args()
    conns, callers = (50, 10) if args.quick else (250, 100)
    scenarios = {
        "matches-iface": lambda p: scenario_matches(p, "iface", conns, 512, args.reps),
        "matches-arg0": lambda p: scenario_matches(p, "arg0", conns, 512, args.reps),
        "replies": lambda p: scenario_replies(p, callers, 100, args.reps),
    }
    if args.only:
        scenarios = {k: v for k, v in scenarios.items() if k in args.only.split(",")}
    targets = ["sealbus", "dbus-daemon", "dbus-broker"] + (["sealbus (before)"] if args.before else [])
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="attack.") as wd:
        for name, fn in scenarios.items():
            for target in targets:
                inst = start(target, wd, args.before)
                try:
                    path = inst.address.split("=", 1)[1]
                    res = fn(path)
                except Exception as e:  # a bus that falls over is a result too
                    res = {"error": f"{type(e).__name__}: {e}"}
                finally:
                    inst.stop()
                results[name, target] = res
                print(f"{name:14} {target:18} {fmt(res)}", file=sys.stderr, flush=True)
    table = render(results, scenarios, targets, conns, callers)
    print(table)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table)


def fmt(res: dict) -> str:
    if "error" in res:
        return res["error"]
    extra = f"refused={res['refused']}" if "refused" in res else f"noreply={res['noreply']}"
    stalls = " ".join(f"{s * 1000:.0f}" for s in res["stalls"])
    return f"stall {res['stall'] * 1000:.0f} ms (reps {stalls}; idle {res['idle'] * 1000:.1f} ms) {extra} " \
           f"setup {res['setup']:.1f} s"  # fmt: skip


def render(results, scenarios, targets, conns, callers) -> str:
    what = {
        "matches-iface": f"{conns} x 512 rules (interface, no member); one peer adds 512 and leaves",
        "matches-arg0": f"{conns} x 512 rules (arg0 only); one peer adds 512 and leaves",
        "replies": f"{callers} callers x 100 calls pending on one service, which leaves",
    }
    out = ["| scenario | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
    for name in scenarios:
        cells = []
        for t in targets:
            res = results[name, t]
            if "error" in res:
                cells.append(res["error"][:60])
                continue
            cell = f"{res['stall'] * 1000:.0f} ms"
            if res.get("refused"):
                cell += f" ({res['refused']} AddMatch refused)"
            cells.append(cell)
        out.append(f"| {what[name]} | " + " | ".join(cells) + " |")
    idle = {t: max(results[n, t].get("idle", 0) for n in scenarios) for t in targets}
    out.append("| (worst Ping round trip when idle) | " + " | ".join(f"{idle[t] * 1000:.1f} ms" for t in targets)
               + " |")  # fmt: skip
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
