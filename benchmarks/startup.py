"""Start-up: from exec to the first answered call (issue #18), sealbus vs dbus-daemon vs dbus-broker.

Test harnesses (GLib's GTestDBus, dbus-run-session, the dbus-tests suite) start a
bus per test, so this is what they wait for. Each start: exec the bus with the
same session-like config file (benchmarks/run_bench.py ``bus_config``), connect
to its socket as soon as it accepts (polled every 0.5 ms: sealbus binds before
it loads its event loop, and a connection waits in the listen backlog), AUTH
EXTERNAL + Hello, and stop the clock at the Hello reply. Targets alternate
within each round, so each ratio pairs starts made moments apart.

    .venv/bin/python -m benchmarks.startup --starts 20          # a table on stdout
    .venv/bin/python -m benchmarks.startup --starts 3 --json -  # raw JSON for benchmarks.run

sealbus and dbus-daemon are direct children: their CPU time to the answer is
read from wait4() (killed with SIGKILL at the answer, so shutdown is not
counted). dbus-broker runs under benchmarks/dbus-broker-wrap (a Python
wrapper that supplies the socket and a journal, as systemd would): its wall
time includes that wrapper's own start (about one bare interpreter start), and
its CPU is not measured.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

from benchmarks import run_bench as rb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEALBUS_DAEMON = os.path.join(ROOT, ".venv", "bin", "sealbus-dbus-daemon")
TARGETS = ("sealbus", "dbus-daemon", "dbus-broker")
BROKER_LAUNCH = ("dbus-broker-launch", "--scope", "user", "--config-file")


def commands(conf: str, sock: str, log: str) -> dict[str, list[str]]:
    """The argv that starts each bus on ``sock`` from the config file ``conf`` (the drop-in gets dbus-daemon's)."""
    return {
        "sealbus": [SEALBUS_DAEMON, "--config-file=" + conf, "--nofork", "--print-address=1"],
        "dbus-daemon": ["dbus-daemon", "--config-file=" + conf, "--nofork", "--print-address=1"],
        "dbus-broker": [sys.executable, rb.WRAP, sock, log, "--", *BROKER_LAUNCH, conf],
    }


def available(target: str) -> bool:
    exe = {"sealbus": SEALBUS_DAEMON, "dbus-daemon": "dbus-daemon", "dbus-broker": "dbus-broker-launch"}[target]
    return os.access(exe, os.X_OK) if os.path.isabs(exe) else shutil.which(exe) is not None


def hello_bytes() -> bytes:
    """AUTH EXTERNAL, BEGIN and a Hello call, in one write (as sd-bus and GDBus pipeline them)."""

    def field(code: int, sig: bytes, value: str) -> bytes:
        v = value.encode()
        return bytes([code, 1]) + sig + b"\0" + struct.pack("<I", len(v)) + v + b"\0"

    def pad8(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % 8)

    fields = (pad8(field(1, b"o", "/org/freedesktop/DBus")) + pad8(field(2, b"s", "org.freedesktop.DBus"))
              + pad8(field(3, b"s", "Hello")) + field(6, b"s", "org.freedesktop.DBus"))  # fmt: skip
    header = b"l\x01\x00\x01" + struct.pack("<III", 0, 1, len(fields))  # no body; serial 1
    auth = b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\nBEGIN\r\n"
    return auth + pad8(header + fields)


def _connect(path: str, proc, deadline: float) -> socket.socket:
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before it listened")
        if time.monotonic() > deadline:
            raise RuntimeError("never listened")
        time.sleep(0.0005)


def _await_reply(s: socket.socket, deadline: float) -> None:
    """Until the OK line and a complete message (the Hello reply) have arrived."""
    buf = b""
    while True:
        s.settimeout(max(0.001, deadline - time.monotonic()))
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("the bus closed the connection: " + buf[:200].decode(errors="replace"))
        buf += chunk
        if not buf.startswith(b"OK "):
            if b"\r\n" in buf:
                raise RuntimeError("authentication refused: " + buf.split(b"\r\n")[0].decode(errors="replace"))
            continue
        msg = buf.split(b"\r\n", 1)[1] if b"\r\n" in buf else b""
        if len(msg) >= 16:
            body_len, _, fields_len = struct.unpack_from("<III", msg, 4)
            if len(msg) >= 16 + fields_len + (-fields_len % 8) + body_len:
                return


def start_once(target: str, timeout: float = 30.0) -> dict:
    """One start of ``target``: wall ms to the Hello reply, and CPU ms where measurable."""
    d = tempfile.mkdtemp(prefix="startup.")
    sock, conf, log = os.path.join(d, "bus"), os.path.join(d, "bus.conf"), os.path.join(d, "log")
    with open(conf, "w") as f:
        f.write(rb.bus_config(sock, {}))
    argv = commands(conf, sock, log)[target]
    proc = None
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + timeout
        with _connect(sock, proc, deadline) as s:
            s.sendall(hello_bytes())
            _await_reply(s, deadline)
            wall = time.perf_counter() - t0
        cpu = None
        if target != "dbus-broker":  # a direct child: its own CPU, killed before any shutdown work
            os.kill(proc.pid, signal.SIGKILL)
            _, _, ru = os.wait4(proc.pid, 0)
            proc.returncode = -9
            cpu = (ru.ru_utime + ru.ru_stime) * 1000
        return {"_ok": True, "wall_ms": wall * 1000, "cpu_ms": cpu}
    except (RuntimeError, OSError) as e:
        return {"_ok": False, "_error": str(e)[:200]}
    finally:
        if proc is not None and proc.returncode is None:
            rb.kill_tree(proc)
        shutil.rmtree(d, ignore_errors=True)


def measure(targets, starts: int, warmup: int = 1) -> dict:
    """``starts`` rounds; in each every target starts once, in alternating order. Warm-up rounds
    (page cache, bytecode) are not kept."""
    runs: dict[str, list] = {t: [] for t in targets}
    for i in range(warmup + starts):
        order = list(targets) if i % 2 == 0 else list(reversed(targets))
        for t in order:
            r = start_once(t)
            if i >= warmup:
                runs[t].append(r)
    return {"starts": starts, "runs": runs}


def paired_ratios(data: dict, a: str, b: str, key: str = "wall_ms") -> list[float]:
    out = []
    for x, y in zip(data["runs"].get(a, []), data["runs"].get(b, []), strict=False):
        if x.get("_ok") and y.get("_ok") and x.get(key) and y.get(key):
            out.append(x[key] / y[key])
    return out


def median_of(data: dict, target: str, key: str) -> float | None:
    vals = [r[key] for r in data["runs"].get(target, []) if r.get("_ok") and r.get(key) is not None]
    return statistics.median(vals) if vals else None


def table(data: dict) -> list[str]:
    """Markdown rows: per target median [min-max] wall and CPU, then 24 starts in sequence."""
    targets = list(data["runs"])
    L = ["| start-up, exec to Hello answered | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
    for key, label in (("wall_ms", "wall ms"), ("cpu_ms", "bus CPU ms")):
        cells = []
        for t in targets:
            vals = [r[key] for r in data["runs"][t] if r.get("_ok") and r.get(key) is not None]
            bad = [r for r in data["runs"][t] if not r.get("_ok")]
            cell = f"{statistics.median(vals):.1f} [{min(vals):.1f}\u2013{max(vals):.1f}]" if vals else "—"
            if bad:
                cell += f" ({len(bad)}/{len(data['runs'][t])} failed: {bad[0].get('_error', '')[:60]})"
            cells.append(cell)
        L.append(f"| {label} | " + " | ".join(cells) + " |")
    per_suite = [median_of(data, t, "wall_ms") for t in targets]
    cells = " | ".join("—" if m is None else f"{24 * m / 1000:.2f}" for m in per_suite)
    L.append(f"| 24 buses in sequence (a GLib suite with a private bus per test), s | {cells} |")
    return L


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--starts", type=int, default=20, help="rounds kept (each starts every target once)")
    p.add_argument("--targets", default=",".join(TARGETS), type=lambda s: s.split(","))
    p.add_argument("--json", metavar="FILE", help="write the raw results there ('-': stdout)")
    a = p.parse_args(argv)
    targets = [t for t in a.targets if available(t)]
    data = measure(targets, a.starts)
    data["skipped"] = [t for t in a.targets if t not in targets]
    if a.json == "-":
        json.dump(data, sys.stdout)
        return 0
    if a.json:
        with open(a.json, "w") as f:
            json.dump(data, f, indent=1)
    print("\n".join(table(data)))
    for other in ("dbus-daemon", "dbus-broker"):
        rs = paired_ratios(data, "sealbus", other)
        if rs:
            print(f"sealbus / {other}, wall: x{statistics.median(rs):.2f} [{min(rs):.2f}\u2013{max(rs):.2f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
