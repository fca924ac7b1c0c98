"""Shared fixtures and helpers for every test file.

Live buses (real processes, real sockets under a 0755 temp dir so other uids reach them):
  ``sealbus``          `sealbus run --address unix:path=...`; a :class:`Bus` (address, path, proc, pid,
                       log_path, fd_count(), rss_kib()); stopped with SIGTERM afterwards.
  ``sealbus_factory``  ``make(*extra_args, name=...)`` for buses with options (e.g. ``--config F``).
  ``dbus_daemon``      the reference dbus-daemon (--session config) for differential tests.
Other users (root only; skips otherwise):
  ``test_users``       [sealbus-test1, sealbus-test2] pwd entries, created with useradd if missing;
                       ``run_as(user, argv)`` / ``popen_as(user, argv, groups=...)`` run a real process as them.
Clients:
  :class:`RawClient`   a bare-socket client: chosen AUTH uid, optional Hello, raw bytes and fds,
                       replies parsed by jeepney; ``closed_by_peer()`` to await a disconnect.
  :class:`LineWatcher` waits for a line in a subprocess's stdout (monitors) instead of sleeping.
  ``bus_is_alive(bus)``  a fresh client can still connect and Ping the driver.
Sans-IO core:
  ``core`` fixture + :class:`CoreClient`  an in-memory ``broker.bus.router.Bus`` and peers that
                       dispatch real wire messages and read their outboxes (exact ordering checks).
"""

import inspect
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

VENV_BIN = os.path.dirname(sys.executable)
SEALBUS = os.path.join(VENV_BIN, "sealbus")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_USERS = ("sealbus-test1", "sealbus-test2")


# -- security tiers: markers, and a loud account of what a run skipped ---------------------------

# ``if os.geteuid() != 0: pytest.skip(...)`` in a test or in one of its fixtures
_ROOT_SKIP = re.compile(r"geteuid\(\)\s*!=\s*0\s*:\s*\n\s*pytest\.skip\(")
_ROOT_REASON = re.compile(r"\broot\b")
_source_needs_root: dict[object, bool] = {}
_TIERS = {
    "root": "root tier (other uids, privilege drop, FUSE mounts, the privilege-separated system bus)",
    "vm": "VM tier (the enforcing SELinux guest)",
}
_THREAT_REF = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def _code_needs_root(func) -> bool:
    if func not in _source_needs_root:
        try:
            _source_needs_root[func] = bool(_ROOT_SKIP.search(inspect.getsource(func)))
        except (OSError, TypeError):
            _source_needs_root[func] = False
    return _source_needs_root[func]


def needs_root(item) -> bool:
    """A test that only runs as root, however it says so: the ``root`` marker, the ``test_users``
    fixture, a skipif whose reason names root, or an inline geteuid skip in it or its fixtures."""
    if item.get_closest_marker("root") is not None or "test_users" in getattr(item, "fixturenames", ()):
        return True
    for m in item.iter_markers("skipif"):
        if _ROOT_REASON.search(str(m.kwargs.get("reason", ""))) or "geteuid" in "".join(map(str, m.args)):
            return True
    funcs = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    if info is not None:
        funcs += [d.func for defs in info.name2fixturedefs.values() for d in defs]
    return any(f is not None and _code_needs_root(f) for f in funcs)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("root") is None and needs_root(item):
            item.add_marker(pytest.mark.root)


def _threat_cited() -> set[str]:
    try:
        text = (Path(ROOT) / "docs" / "threat-model.md").read_text()
    except OSError:
        return set()
    return {f"{path}::{name}" for path, name in _THREAT_REF.findall(text)}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say loudly which security tiers this run did not exercise, and how many tests that is."""
    skipped: dict[str, list] = {tier: [] for tier in _TIERS}
    for rep in terminalreporter.stats.get("skipped", []):
        for tier in _TIERS:
            if tier in getattr(rep, "keywords", {}):
                skipped[tier].append(rep)
    cited = _threat_cited()
    lines = []
    for tier, reps in skipped.items():
        if not reps:
            continue
        ids = {r.nodeid.split("[")[0] for r in reps}
        n_cited = len(ids & cited)
        why = " (not root)" if tier == "root" and os.geteuid() != 0 else ""
        lines.append(f"{_TIERS[tier]}: {len(reps)} test(s) SKIPPED{why}; {n_cited} of them are the evidence "
                     f"docs/threat-model.md cites for a mitigation")  # fmt: skip
    if not os.path.exists("/dev/kvm") and not os.environ.get("SEALBUS_VM"):
        lines.append(f"{_TIERS['vm']}: cannot run on this host (no /dev/kvm; `make vm-test` runs it where there is)")
    if not lines:
        return
    tr = terminalreporter
    tr.write_sep("!", "SECURITY TIERS NOT EXERCISED BY THIS RUN", red=True, bold=True)
    for line in lines:
        tr.write_line(line, red=True, bold=True)
    if skipped["root"] and os.geteuid() != 0:
        tr.write_line("a green run without root does not show the threat model holds: run the suite as root",
                      red=True, bold=True)  # fmt: skip


def terminate(proc: subprocess.Popen, timeout: float) -> int:
    """SIGTERM ``proc`` if it still runs, SIGKILL if it has not exited ``timeout`` seconds later; its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


class Bus:
    """A running bus process: ``address`` (unix:path=...), ``path`` of its socket,
    ``proc``, and ``log_path`` (its stderr, for asserting on log lines)."""

    def __init__(self, proc, address, path, log_path=None):
        self.proc = proc
        self.address = address
        self.path = path
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self) -> int:
        rc = terminate(self.proc, timeout=10)
        shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)
        return rc


def start_sealbus(tmp_path, *args, name="bus") -> Bus:
    """Start `sealbus run` on a socket reachable by every uid; extra args go to `sealbus run`."""
    sockdir = tempfile.mkdtemp(prefix="sealbus-test-")
    os.chmod(sockdir, 0o755)  # other test users must reach the socket
    path = Path(sockdir) / name
    log = open(tmp_path / f"{name}.log", "w")
    proc = subprocess.Popen([SEALBUS, "run", "--address", f"unix:path={path}", *args],
                            stdout=subprocess.PIPE, stderr=log, text=True)  # fmt: skip
    address = proc.stdout.readline().strip()
    if not address:
        proc.wait(timeout=10)
        raise RuntimeError("sealbus did not start: " + (tmp_path / f"{name}.log").read_text())
    return Bus(proc, address, path, tmp_path / f"{name}.log")


def start_dbus_daemon(tmp_path, config: str | None = None, name="dd") -> Bus:
    sockdir = tempfile.mkdtemp(prefix="sealbus-test-")
    os.chmod(sockdir, 0o755)
    path = Path(sockdir) / name
    args = ["dbus-daemon", "--nofork", "--print-address=1", f"--address=unix:path={path}"]
    args.append(f"--config-file={config}" if config else "--session")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    address = proc.stdout.readline().strip().split(",guid=")[0]
    return Bus(proc, address, path)


@pytest.fixture
def sealbus(tmp_path):
    bus = start_sealbus(tmp_path)
    yield bus
    bus.stop()


@pytest.fixture
def sealbus_factory(tmp_path):
    buses = []

    def make(*args, name="bus"):
        b = start_sealbus(tmp_path, *args, name=name)
        buses.append(b)
        return b

    yield make
    for b in buses:
        b.stop()


@pytest.fixture
def dbus_daemon(tmp_path):
    bus = start_dbus_daemon(tmp_path)
    yield bus
    bus.stop()


def ensure_test_users() -> list[pwd.struct_passwd]:
    """Create (once) the unprivileged users tests run clients as."""
    out = []
    for u in TEST_USERS:
        try:
            out.append(pwd.getpwnam(u))
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", u],
                           check=True)  # fmt: skip
            out.append(pwd.getpwnam(u))
    return out


@pytest.fixture
def test_users():
    if os.geteuid() != 0:
        pytest.skip("needs root to run clients as other users")
    return ensure_test_users()


def run_as(user: pwd.struct_passwd, argv, **kw) -> subprocess.CompletedProcess:
    """Run a command as another user (real setuid/setgid in the child)."""

    def demote():
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 30)
    return subprocess.run(argv, preexec_fn=demote, **kw)


def have(cmd: str) -> bool:
    return shutil.which(cmd) is not None


# -- sans-IO bus core harness (tests/test_bus_*.py) ------------------------------------------


class CoreClient:
    """A peer of an in-memory ``broker.bus.router.Bus``: builds real wire messages,
    dispatches them through the core, and parses what lands in its outbox.

    Why: the routing/driver logic is sans-IO, so ordering and reply-tracking
    rules can be checked exactly, without sockets or timing."""

    def __init__(self, core, uid: int = 1000, pid: int = 4242, gids=(1000,), hello: bool = True,
                 label: str | None = None):  # fmt: skip
        from broker.bus.peer import Creds

        self.core = core
        self.peer = core.connect(Creds(uid, tuple(gids), pid, label))
        self.serial = 0
        if hello:
            self.call("Hello")
            self.take()

    @property
    def name(self) -> str:
        return self.peer.unique_name

    def send(self, msg_type: int, *, signature: str = "", body: tuple = (), flags: int = 0, **fields) -> int:
        from broker.wire.message import HeaderView, build_message

        self.serial += 1
        raw = build_message(msg_type, self.serial, signature=signature, body=body, flags=flags, **fields)
        self.core.dispatch(self.peer, (HeaderView(memoryview(raw)), []))
        return self.serial

    def call(
        self,
        member: str,
        signature: str = "",
        body: tuple = (),
        *,
        dest: str = "org.freedesktop.DBus",
        path: str = "/org/freedesktop/DBus",
        interface: str | None = "org.freedesktop.DBus",
        flags: int = 0,
    ) -> int:
        return self.send(1, signature=signature, body=body, flags=flags, destination=dest, path=path,
                         interface=interface, member=member)  # fmt: skip

    def signal(
        self,
        interface: str,
        member: str,
        signature: str = "",
        body: tuple = (),
        *,
        path: str = "/",
        dest: str | None = None,
    ) -> int:
        return self.send(4, signature=signature, body=body, path=path, interface=interface, member=member,
                         destination=dest)  # fmt: skip

    def take(self) -> list:
        """Drain the outbox: [(HeaderView, body tuple)] in delivery order."""
        from broker.wire.message import HeaderView

        out = []
        while self.peer.outbox:
            item = self.peer.outbox.popleft()
            raw = b"".join(bytes(b) for b in item.buffers)
            self.peer.item_done(item)
            h = HeaderView(memoryview(raw))
            out.append((h, h.unmarshal_body() if h.signature else ()))
        return out


def summarize(msgs) -> list[tuple]:
    """Messages as comparable tuples: (kind, member-or-error, body) with reply/return collapsed."""
    kinds = {1: "call", 2: "return", 3: "error", 4: "signal"}
    out = []
    for h, body in msgs:
        what = h.error_name if h.type == 3 else h.member
        out.append((kinds[h.type], what, tuple(body) if h.type != 3 else ()))
    return out


@pytest.fixture
def core():
    """A fresh sans-IO bus core with the session defaults, owned (as the shell does) by this process."""
    from broker.bus.limits import session_limits
    from broker.bus.router import Bus as CoreBus
    from broker.io.creds import own_creds

    return CoreBus(session_limits(), own=own_creds())


# -- raw clients for protocol-level and adversarial tests ------------------------------------


class RawClient:
    """A D-Bus client on a bare socket: the test decides every byte it sends
    (wrong uid in AUTH, no Hello, forged fields, fds) and parses replies with
    jeepney's parser, which nobody here wrote."""

    def __init__(self, bus, timeout: float = 10):
        import socket

        from jeepney.low_level import Parser

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(bus.path))
        self.parser = Parser()
        self.serial = 0
        self.unique_name = None

    def authenticate(self, uid: int | None = None, fds: bool = True) -> bytes:
        """AUTH EXTERNAL claiming ``uid`` (default: our own); the server's reply line."""
        uid = os.getuid() if uid is None else uid
        self.sock.sendall(b"\0AUTH EXTERNAL " + str(uid).encode().hex().encode() + b"\r\n")
        reply = self._line()
        if reply.startswith(b"OK"):
            if fds:
                self.sock.sendall(b"NEGOTIATE_UNIX_FD\r\n")
                assert self._line().startswith(b"AGREE_UNIX_FD")
            self.sock.sendall(b"BEGIN\r\n")
        return reply

    def _line(self) -> bytes:
        from benchmarks.rawauth import read_line

        return read_line(self.sock)

    def next_serial(self) -> int:
        self.serial += 1
        return self.serial

    def send_raw(self, data: bytes, fds=()) -> None:
        import array
        import socket

        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            self.sock.sendall(data)

    def call(self, member: str, signature: str = "", body: tuple = (), *, dest="org.freedesktop.DBus",
             path="/org/freedesktop/DBus", interface="org.freedesktop.DBus", flags=0) -> int:  # fmt: skip
        from broker.wire.message import build_message

        serial = self.next_serial()
        self.send_raw(build_message(1, serial, path=path, interface=interface, member=member, destination=dest,
                                    signature=signature, body=body, flags=flags))  # fmt: skip
        return serial

    def hello(self) -> list:
        """Send Hello; return the messages up to and including NameAcquired for our name."""
        serial = self.call("Hello")
        msgs = self.until(lambda m: m.header.fields.get(_HF_MEMBER) == "NameAcquired")
        reply = next(m for m in msgs if m.header.fields.get(_HF_REPLY_SERIAL) == serial)
        self.unique_name = reply.body[0]
        return msgs

    def recv(self):
        """The next message (jeepney Message); raises ConnectionError on EOF, TimeoutError."""
        import array
        import socket

        while True:
            msg = self.parser.get_next_message()
            if msg is not None:
                return msg
            data, anc, _flags, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(253 * 4))
            fds = []
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(raw[: len(raw) - len(raw) % 4])
                    fds.extend(a)
            if not data:
                raise ConnectionError("the bus closed the connection")
            self.parser.add_data(data, fds)

    def until(self, pred) -> list:
        """Receive messages until one satisfies ``pred``; return all of them."""
        out = []
        while True:
            m = self.recv()
            out.append(m)
            if pred(m):
                return out

    def reply_to(self, serial: int) -> list:
        return self.until(lambda m: m.header.fields.get(_HF_REPLY_SERIAL) == serial)

    def closed_by_peer(self, timeout: float = 10) -> bool:
        """True once the bus has closed this connection (anything still queued is read and ignored)."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
            return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def _hf(name):
    from jeepney.low_level import HeaderFields

    return HeaderFields[name]


_HF_MEMBER = _hf("member")
_HF_REPLY_SERIAL = _hf("reply_serial")


def describe_msg(m, names: dict[str, str] | None = None) -> tuple:
    """A jeepney message as a comparable tuple; unique names replaced by roles via ``names``."""
    from jeepney.low_level import HeaderFields

    f = m.header.fields
    names = names or {}

    def ren(v):
        if isinstance(v, str):
            return names.get(v, v)
        if isinstance(v, list):
            return [ren(x) for x in v]
        return v

    kind = m.header.message_type.name
    what = f.get(HeaderFields.error_name) if kind == "error" else f.get(HeaderFields.member)
    body = tuple(ren(v) for v in m.body) if kind != "error" else ()
    return (kind, what, body)


def bus_is_alive(bus) -> bool:
    """A fresh client can still connect and get an answer from the driver."""
    from jeepney import DBusAddress, new_method_call
    from jeepney.io.blocking import open_dbus_connection

    with open_dbus_connection(bus.address) as c:
        r = c.send_and_get_reply(new_method_call(DBusAddress("/", bus_name="org.freedesktop.DBus",
                                                             interface="org.freedesktop.DBus.Peer"), "Ping"),
                                 timeout=10)  # fmt: skip
        return r.header.message_type.name == "method_return"


def wait_until(pred, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll a condition that has no event to wait on (e.g. /proc fd counts); its last value."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def connected(bus, timeout: float = 10) -> "RawClient":
    """A RawClient that has authenticated (with fd passing) and said Hello."""
    c = RawClient(bus, timeout=timeout)
    assert c.authenticate().startswith(b"OK ")
    c.hello()
    return c


def assert_fds_back_and_alive(bus, base: int) -> None:
    """The broker is back to at most ``base`` open fds and still serves a fresh client."""
    assert wait_until(lambda: bus.fd_count() <= base), (bus.fd_count(), base)
    assert bus_is_alive(bus)


class LineWatcher:
    """Collects a subprocess's stdout lines in a thread so a test can wait for a
    line (an event) instead of sleeping."""

    def __init__(self, proc):
        import threading

        self.proc = proc
        self.lines: list[str] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    @property
    def text(self) -> str:
        with self.cond:
            return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float = 15) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: needle in "".join(self.lines) or self.proc.poll() is not None,
                                      timeout) and needle in "".join(self.lines)  # fmt: skip

    def wait_ready(self, poke, needle: str, timeout: float = 15) -> bool:
        """Call ``poke()`` until ``needle`` shows up: for monitors, whose readiness has no other signal."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            poke()
            with self.cond:
                if self.cond.wait_for(lambda: needle in "".join(self.lines), 0.2):
                    return True
        return False

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def popen_as(user: pwd.struct_passwd, argv, groups=(), **kw) -> subprocess.Popen:
    """Start a process as another user, with the given supplementary groups."""

    def demote():
        os.setgroups(list(groups))
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    return subprocess.Popen(argv, preexec_fn=demote, **kw)
