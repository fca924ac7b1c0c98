"""Running the same scripted clients through dbus-daemon and through sealbus on the same
config, so policy decisions can be compared one by one. Nothing here may block a test:
every wait has a timeout, and every process is stopped on the way out."""

import os
import select
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .conftest import SEALBUS, run_as

DBUS_DAEMON = ["dbus-daemon"]
SEALBUS_DAEMON = [SEALBUS, "dbus-daemon"]

# What a client script prints for one decision: allow, deny (AccessDenied), error (any other
# error), noreply (no answer in time); connect:hung when even Hello gets no answer.
CLIENT_PRELUDE = r"""
import signal, sys
from jeepney import DBusAddress, MessageType, message_bus, new_method_call
from jeepney.io.blocking import open_dbus_connection

def hung(*a):
    raise TimeoutError

signal.signal(signal.SIGALRM, hung)
signal.alarm(3)
try:
    c = open_dbus_connection(sys.argv[1])
except TimeoutError:
    print("connect:hung"); sys.exit(0)
except Exception:
    print("connect:deny"); sys.exit(0)
signal.alarm(0)
out = ["connect:allow"]

def ask(msg):
    try:
        r = c.send_and_get_reply(msg, timeout=3)
    except TimeoutError:
        return "noreply"
    if r.header.message_type == MessageType.method_return:
        return "allow"
    return "deny" if "AccessDenied" in str(r.header.fields) else "error"
"""


def first_line(proc, seconds: float) -> str:
    """The first line a child prints, or "" if it prints nothing in time."""
    ready, _, _ = select.select([proc.stdout], [], [], seconds)
    return proc.stdout.readline() if ready else ""


def outcomes(daemon_cmd, config_body: str, users, tmp, client: str, service: str, args=()) -> dict:
    """{"service": ..., user: decisions} for one broker: the service script runs as root and
    prints "ready ..." once set up; then the client script runs as root and as each user."""
    conf = Path(tmp) / "bus.conf"
    sockdir = tempfile.mkdtemp(prefix="sealbus-diff-")
    os.chmod(sockdir, 0o755)
    sock = Path(sockdir) / "bus"
    conf.write_text(f"<busconfig><type>system</type><listen>unix:path={sock}</listen><auth>EXTERNAL</auth>"
                    f"{config_body}</busconfig>")  # fmt: skip
    os.chmod(conf, 0o644)
    errlog = open(Path(tmp) / f"{Path(daemon_cmd[-1]).name}.stderr", "w+")
    bus = subprocess.Popen([*daemon_cmd, f"--config-file={conf}", "--nofork", "--print-address=1"],
                           stdout=subprocess.PIPE, stderr=errlog, text=True)  # fmt: skip
    svc = None
    try:
        addr = first_line(bus, 30).strip().split(",guid=")[0]
        if not addr:
            errlog.seek(0)
            return {"refused": "the broker refused the configuration"}
        svc = subprocess.Popen([sys.executable, "-c", service, addr, *args], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)  # fmt: skip
        line = first_line(svc, 60).strip()
        res = {"service": line if line.startswith("ready") else "not-ready"}
        argv = [sys.executable, "-c", client, addr, *args]
        for u in users:
            r = run_as(u, argv, timeout=240) if u is not None else \
                subprocess.run(argv, capture_output=True, text=True, timeout=240)  # fmt: skip
            res[u.pw_name if u else "root"] = r.stdout.strip() or r.stderr[-300:]
        return res
    finally:
        if svc is not None:
            svc.kill()
            svc.wait()
        bus.terminate()
        bus.wait(timeout=10)
        errlog.close()


def compare(theirs: dict, ours: dict) -> tuple[int, int]:
    """(decisions, agreeing decisions), counted word by word."""
    decisions = sum(len(v.split()) for v in theirs.values())
    agree = sum(a == b for k in theirs for a, b in zip(theirs[k].split(), ours.get(k, "").split(), strict=False))
    return decisions, agree


def require_dbus_daemon() -> None:
    if subprocess.run(["which", "dbus-daemon"], capture_output=True).returncode != 0:
        pytest.fail("dbus-daemon is not installed (scripts/setup.sh installs it)")
