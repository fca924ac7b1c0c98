"""Running the same scripted clients through dbus-daemon and through sealbus on the same
config, so policy decisions can be compared one by one. Nothing here may block a test:
every wait has a timeout, and every process is stopped (and its socket directory removed)
on the way out, whatever happened.

    outcomes(daemon_cmd, config_body, users, tmp, client, service, args=()) -> dict
        the bus on a fresh socket with ``<type>system</type>``, its own ``<listen>``,
        ``<auth>EXTERNAL</auth>`` and ``config_body``; the ``service`` script (python, as root)
        until it prints its first line; then the ``client`` script once per user (None = root),
        one process each, in turn. {"service": ..., "root": client stdout, user name: ...}.
    bus_running / service_running (Service) / run_client   the steps, for other compositions.
    compare(theirs, ours) -> (decisions, agreeing decisions)
"""

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import SEALBUS, popen_as, run_as

DBUS_DAEMON = ["dbus-daemon"]
SEALBUS_DAEMON = [SEALBUS, "dbus-daemon"]

BUS_START_TIMEOUT = 30  # s until the bus prints its address (a refused config makes it exit at once)
SERVICE_READY_TIMEOUT = 30  # s until the service prints its first line
CLIENT_TIMEOUT = 120  # s for one whole client script (each call in it has its own 3 s limit)
STOP_TIMEOUT = 10
SYNC_TIMEOUT = 10  # s for a service to report what it received

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
    """The first line a child prints, or "" if it prints nothing in time (never blocks)."""
    ready, _, _ = select.select([proc.stdout], [], [], seconds)
    return proc.stdout.readline() if ready else ""


def _stop(proc, *, kill: bool = False) -> None:
    """Stop a child we started (terminate, or kill), never waiting without a limit."""
    if proc.poll() is None:
        proc.kill() if kill else proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)
    if proc.stdout is not None:
        proc.stdout.close()


def busconfig(sock, config_body: str) -> str:
    return (f"<busconfig><type>system</type><listen>unix:path={sock}</listen><auth>EXTERNAL</auth>"
            f"{config_body}</busconfig>")  # fmt: skip


@contextlib.contextmanager
def bus_running(daemon_cmd, config_body: str, tmp):
    """``daemon_cmd --config-file=X --nofork --print-address=1``; yields (address or None, stderr tail).

    None: no address in time (the broker refused the config, or hung); the stderr tail says why."""
    tag = "-".join(Path(a).name for a in daemon_cmd)  # "dbus-daemon" / "sealbus-dbus-daemon"
    sockdir = tempfile.mkdtemp(prefix="sealbus-diff-")
    os.chmod(sockdir, 0o755)  # clients run as other uids
    conf = Path(tmp) / f"{tag}.conf"
    conf.write_text(busconfig(Path(sockdir) / "bus", config_body))
    os.chmod(conf, 0o644)
    errpath = Path(tmp) / f"{tag}.stderr"
    bus = None
    try:
        with open(errpath, "w") as errlog:
            bus = subprocess.Popen([*daemon_cmd, f"--config-file={conf}", "--nofork", "--print-address=1"],
                                   stdout=subprocess.PIPE, stderr=errlog, stdin=subprocess.DEVNULL,
                                   text=True)  # fmt: skip
        addr = first_line(bus, BUS_START_TIMEOUT).strip().split(",guid=")[0] or None
        if addr is None:
            _stop(bus)
        yield addr, errpath.read_text()[-2000:]
    finally:
        if bus is not None:
            _stop(bus)
        shutil.rmtree(sockdir, ignore_errors=True)


class Service:
    """A service script (python) on the bus, as ``user`` (None = root). ``line`` is its first line
    ("" if none in time). With ``sync``, its stdin is a pipe: ``sync()`` writes "sync" and returns
    the lines it prints up to "synced" (the script then reports what it received meanwhile)."""

    def __init__(self, address: str, source: str, args=(), user=None, sync: bool = False):
        argv = [sys.executable, "-c", source, address, *args]
        kw = dict(stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0,
                  stdin=subprocess.PIPE if sync else subprocess.DEVNULL)  # fmt: skip
        self.proc = subprocess.Popen(argv, **kw) if user is None else popen_as(user, argv, **kw)
        self._buf = b""
        self.line = ""

    def wait_ready(self) -> str:
        self.line = self._next_line(SERVICE_READY_TIMEOUT)
        return self.line

    def _next_line(self, seconds: float) -> str:
        """The next line the script prints, stripped; "" at EOF or if none comes in time (no read blocks)."""
        deadline = time.monotonic() + seconds
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return ""
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return ""
            self._buf += chunk
        ln, self._buf = self._buf.split(b"\n", 1)
        return ln.decode(errors="replace").strip() or " "

    def sync(self, timeout: float = SYNC_TIMEOUT) -> list[str]:
        if not self.line or self.proc.poll() is not None:
            return ["service:gone"]
        try:
            self.proc.stdin.write(b"sync\n")
            self.proc.stdin.flush()
        except OSError:
            return ["service:gone"]
        lines, deadline = [], time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ln = self._next_line(left)
            if ln == "synced":
                return lines
            if not ln:
                break
            lines.append(ln)
        return [*lines, "service:sync-timeout" if self.proc.poll() is None else "service:gone"]

    def stop(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        _stop(self.proc, kill=True)


@contextlib.contextmanager
def service_running(address: str, source: str, args=(), user=None, sync: bool = False):
    """A :class:`Service` for the duration of the block, killed afterwards."""
    svc = Service(address, source, args, user, sync)
    try:
        svc.wait_ready()
        yield svc
    finally:
        svc.stop()


def run_client(user, source: str, args=(), timeout: float = CLIENT_TIMEOUT) -> str:
    """The ``source`` script (python) as ``user`` (pwd entry; None = root): its stdout, else its stderr tail."""
    argv = [sys.executable, "-c", source, *args]
    try:
        if user is None:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        else:
            r = run_as(user, argv, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:  # subprocess.run has killed it
        return "client:timeout"
    return r.stdout.strip() or r.stderr[-300:]


def user_name(user) -> str:
    return user.pw_name if user is not None else "root"


def _ready(line: str):
    return (line if line.startswith("ready") else "not-ready"), ()


def outcomes(daemon_cmd, config_body: str, users, tmp, client: str, service: str, args=(), *,
             ready=_ready, refused_ok: bool = False, service_users=(None,), sync: bool = False) -> dict:  # fmt: skip
    """{"service": ..., user: client output} for one broker on one config.

    ``args`` go to the service and to every client (after the address). ``ready(first line)`` gives
    (what to record for the service, extra args for the clients). ``service_users``: the service
    runs once per entry, in turn (None = root; a later one is keyed "service NAME"; the clients get
    the first one's extra args). With ``sync``, each service is synced after each client and what it
    printed meanwhile is recorded as "USER @service". A broker that does not start fails the test,
    or with ``refused_ok`` gives {"bus": "refused"} (to compare with the other broker)."""
    with bus_running(daemon_cmd, config_body, tmp) as (addr, err), contextlib.ExitStack() as stack:
        if addr is None:
            if refused_ok:
                return {"bus": "refused"}
            pytest.fail(f"{daemon_cmd} did not start: {err}")
        res, extra, services = {}, None, []
        for i, su in enumerate(service_users):
            svc = stack.enter_context(service_running(addr, service, args, su, sync))
            record, more = ready(svc.line)
            res["service" if i == 0 else f"service {user_name(su)}"] = record
            extra = more if extra is None else extra
            services.append(svc)
        for u in users:
            res[user_name(u)] = run_client(u, client, (addr, *args, *extra))
            if sync:
                res[f"{user_name(u)} @service"] = [ln for svc in services for ln in svc.sync()]
        return res


def decisions_of(res: dict) -> dict:
    """One entry per decision: JSON-object outputs key by key, other outputs word by word."""
    out = {}
    for who, v in res.items():
        if isinstance(v, str):
            try:
                v = json.loads(v) if v.startswith("{") else v
            except ValueError:
                pass
        if isinstance(v, dict):
            out.update({(who, k): x for k, x in v.items()})
        else:
            out.update({(who, i): w for i, w in enumerate(str(v).split())})
    return out


def compare(theirs: dict, ours: dict) -> tuple[int, int]:
    """(decisions, agreeing decisions); dbus-daemon's outcomes (``theirs``) define the decisions."""
    a, b = decisions_of(theirs), decisions_of(ours)
    return len(a), sum(b.get(k, object()) == v for k, v in a.items())


def mismatches(theirs: dict, ours: dict) -> list[tuple]:
    """[(who, action, dbus-daemon's outcome, sealbus's outcome)] for every decision that differs."""
    a, b = decisions_of(theirs), decisions_of(ours)
    return [(*k, a.get(k, "-"), b.get(k, "-")) for k in sorted(a.keys() | b.keys(), key=str) if a.get(k) != b.get(k)]


def require_dbus_daemon() -> None:
    if shutil.which("dbus-daemon") is None:
        pytest.fail("dbus-daemon is not installed (scripts/setup.sh installs it)")
