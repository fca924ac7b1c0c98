"""``sealbus bench``: a quick comparison an installed sealbus can run on its own.

It starts a fresh sealbus and, where installed, a fresh dbus-daemon, each on a
socket in a private temp dir, and measures the same two things on each with the
same Python (jeepney) client: method-call round trips and sealed-memfd payload
transfers. Any other running bus (dbus-broker under systemd, say) can be added
with ``--bus LABEL=ADDRESS``. The client is Python, so absolute numbers include
its own cost; the ratios between buses are what this is for. The full
benchmark (C load generator, dbus-broker, plots) is ``make bench`` in a source
checkout.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from jeepney import DBusAddress, MessageType, message_bus, new_error, new_method_call, new_method_return
from jeepney.io.blocking import open_dbus_connection

from .memfd import seal
from .payload import open_trusted

NAME = "org.sealbus.Bench"
IFACE = "org.sealbus.Bench"
ADDR = DBusAddress("/org/sealbus/Bench", bus_name=NAME, interface=IFACE)


class BenchError(Exception):
    """A bus that could not be started or measured: one line for the user."""


def _start(argv: list[str], label: str) -> tuple[subprocess.Popen, str]:
    """Start a bus that prints its address on the first line of stdout; (process, address)."""
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
    except OSError as e:
        raise BenchError(f"{label}: cannot start {argv[0]}: {e.strerror}") from None
    line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        _, err = proc.communicate()
        raise BenchError(f"{label} did not start: {err.strip()[-300:]}")
    return proc, line.split(",guid=")[0]


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _serve(address: str, ready: threading.Event, stop: threading.Event, errors: list) -> None:
    """The receiving peer: owns NAME, answers Ping, maps (and checks the seals of) every payload."""
    try:
        conn = open_dbus_connection(address, enable_fds=True)
        conn.send_and_get_reply(message_bus.RequestName(NAME), timeout=10)
    except Exception as e:  # reported by the measuring thread
        errors.append(e)
        ready.set()
        return
    ready.set()
    with conn:
        while not stop.is_set():
            try:
                msg = conn.receive(timeout=0.2)
            except TimeoutError:
                continue
            if msg.header.message_type != MessageType.method_call:
                continue
            try:
                reply = _answer(msg)
            except Exception as e:  # a refused payload is an error reply, not a dead receiver
                reply = new_error(msg, "org.sealbus.Bench.Error", "s", (str(e),))
            conn.send(reply)


def _answer(msg):
    if msg.header.fields.get(3) != "Take":  # 3: MEMBER
        return new_method_return(msg, "ay", (msg.body[0] if msg.body else b"",))
    fd = msg.body[0].to_raw_fd()
    try:
        view, _kind = open_trusted(fd)
        size = len(view)
        view.release()
    finally:
        os.close(fd)
    return new_method_return(msg, "t", (size,))


def _call(conn, msg):
    reply = conn.send_and_get_reply(msg, timeout=30)
    if reply.header.message_type == MessageType.error:
        raise BenchError(f"error reply: {reply.header.fields.get(4)} {reply.body}")
    return reply


def measure(address: str, calls: int, payloads: int, size: int) -> dict:
    """Round trips and sealed-payload transfers through the bus at address."""
    ready, stop, errors = threading.Event(), threading.Event(), []
    server = threading.Thread(target=_serve, args=(address, ready, stop, errors), daemon=True)
    server.start()
    try:
        ready.wait(30)
        if errors or not ready.is_set():
            raise BenchError(f"cannot connect to {address}: {errors[0] if errors else 'timeout'}")
        with open_dbus_connection(address, enable_fds=True) as conn:
            ping = new_method_call(ADDR, "Ping", "ay", (b"x" * 16,))
            for _ in range(min(100, calls)):  # warm up
                _call(conn, ping)
            rtts = []
            start = time.perf_counter()
            for _ in range(calls):
                t0 = time.perf_counter()
                _call(conn, ping)
                rtts.append(time.perf_counter() - t0)
            elapsed = time.perf_counter() - start
            data = os.urandom(size)
            transfers = []
            for _ in range(payloads):
                t0 = time.perf_counter()
                fd = seal(data)
                try:
                    reply = _call(conn, new_method_call(ADDR, "Take", "h", (fd,)))
                finally:
                    os.close(fd)
                transfers.append(time.perf_counter() - t0)
                if reply.body[0] != size:
                    raise BenchError(f"payload arrived with {reply.body[0]} bytes, not {size}")
    finally:
        stop.set()
        server.join(5)
    return {"calls_per_s": calls / elapsed, "rtt_us": statistics.median(rtts) * 1e6,
            "payload_ms": statistics.median(transfers) * 1e3 if transfers else None}  # fmt: skip


def _size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in units else ""
    try:
        n = int(t[: len(t) - len(unit)]) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4096, 64K, 1M)") from None
    if not 0 < n <= 1 << 30:
        raise argparse.ArgumentTypeError("the payload size must be between 1 byte and 1 GiB")
    return n


def _bus_spec(text: str) -> tuple[str, str]:
    label, sep, address = text.partition("=")
    if not sep or not label or not address:
        raise argparse.ArgumentTypeError(f"--bus takes LABEL=ADDRESS, e.g. dbus-broker=unix:path=/run/user/0/bus, "
                                         f"not {text!r}")  # fmt: skip
    return label, address


def _start_target(name: str, wd: str) -> tuple[subprocess.Popen, str]:
    sock = os.path.join(wd, f"{name}.sock")
    if name == "sealbus":
        return _start([sys.executable, "-m", "broker.cli", "run", "--log-level", "warning", "--address",
                       f"unix:path={sock}"], name)  # fmt: skip
    return _start(["dbus-daemon", "--session", "--nofork", "--nopidfile", "--print-address=1",
                   f"--address=unix:path={sock}"], name)  # fmt: skip


def _row(label: str, r: dict | None, note: str = "") -> str:
    if r is None:
        return f"{label:<14} {note}"
    pay = f"{r['payload_ms']:10.3f}" if r["payload_ms"] is not None else f"{'-':>10}"
    return f"{label:<14} {r['calls_per_s']:10.0f} {r['rtt_us']:10.1f} {pay}"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="sealbus bench",
        description="Compare sealbus with dbus-daemon (and any running bus given with --bus): method-call round "
        "trips and sealed-memfd payload transfers, measured with one Python (jeepney) client against a fresh "
        "bus of each kind. Ratios are what to read; absolute numbers include the Python client's cost. The "
        "full benchmark (C load generator, dbus-broker, plots) is `make bench` in a source checkout.",
    )
    p.add_argument("--targets", default="sealbus,dbus-daemon",
                   help="buses to start, comma-separated: sealbus, dbus-daemon (default: both; one that is not "
                        "installed is reported and skipped)")  # fmt: skip
    p.add_argument(
        "--bus",
        action="append",
        type=_bus_spec,
        default=[],
        metavar="LABEL=ADDRESS",
        help="also measure an already running bus, e.g. dbus-broker=unix:path=/run/user/0/bus",
    )
    p.add_argument("--calls", type=int, default=2000, help="round trips per bus (default 2000)")
    p.add_argument("--payloads", type=int, default=20, help="sealed payloads per bus (default 20)")
    p.add_argument("--payload-size", type=_size, default=1 << 20, metavar="SIZE", help="bytes per payload "
                   "(default 1M)")  # fmt: skip
    a = p.parse_args(argv)
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    for t in targets:
        if t not in ("sealbus", "dbus-daemon"):
            p.error(f"unknown target {t!r}: sealbus or dbus-daemon (measure others with --bus LABEL=ADDRESS)")
    if a.calls < 1 or a.payloads < 0:
        p.error("--calls must be at least 1 and --payloads at least 0")
    print(f"sealbus bench: {a.calls} round trips (16-byte Ping) and {a.payloads} sealed payloads of "
          f"{a.payload_size} bytes per bus, one jeepney client", flush=True)  # fmt: skip
    print(f"{'bus':<14} {'calls/s':>10} {'rtt µs':>10} {'payload ms':>10}", flush=True)
    measured = 0
    with tempfile.TemporaryDirectory(prefix="sealbus-bench.") as wd:
        for label, address in [(t, None) for t in targets] + a.bus:
            if address is None and label == "dbus-daemon" and shutil.which("dbus-daemon") is None:
                print(_row(label, None, "skipped: dbus-daemon is not installed"), flush=True)
                continue
            proc = None
            try:
                if address is None:
                    proc, address = _start_target(label, wd)
                print(_row(label, measure(address, a.calls, a.payloads, a.payload_size)), flush=True)
                measured += 1
            except BenchError as e:
                print(_row(label, None, f"failed: {e}"), flush=True)
            finally:
                if proc is not None:
                    _stop(proc)
    return 0 if measured else 1
