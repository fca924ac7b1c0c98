"""`sealbus dbus-daemon` as a drop-in for dbus-daemon's command line, with real processes: --fork (and
<fork/>, <pidfile>, --nopidfile) with stdio open or closed, unix:tmpdir=, the connection and name limits
(Hello answered with LimitsExceeded, root counted), every dbus-daemon <limit> name, the Features property;
and the cases of Debian's dbus-tests package (the reference implementation's own tests) that cover them."""

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from jeepney.auth import BEGIN, make_auth_external
from jeepney.bus_messages import message_bus
from jeepney.low_level import HeaderFields, MessageType, Parser

from .conftest import VENV_BIN, wait_until

SEALBUS_DD = os.path.join(VENV_BIN, "sealbus-dbus-daemon")
DBUS_DAEMON = "/usr/bin/dbus-daemon"
DBUS_TESTS = "/usr/lib/dbus-1.0/installed-tests/dbus"
LIMITS_EXCEEDED = "org.freedesktop.DBus.Error.LimitsExceeded"

CONF = """<busconfig><type>session</type>{extra}<listen>unix:tmpdir={dir}</listen>
  <policy context="default"><allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/>
  <allow own="*"/></policy></busconfig>"""

needs_dbus_send = pytest.mark.skipif(shutil.which("dbus-send") is None, reason="no dbus-send")


def write_conf(tmp_path: Path, extra: str = "", name: str = "bus.conf") -> Path:
    sockdir = tmp_path / "sock"
    sockdir.mkdir(exist_ok=True)
    sockdir.chmod(0o755)
    conf = tmp_path / name
    conf.write_text(CONF.format(extra=extra, dir=sockdir))
    conf.chmod(0o644)
    return conf


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not reaped yet by init in a container) is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def list_names(address: str) -> str:
    out = subprocess.run(["dbus-send", f"--bus={address}", "--print-reply", "--dest=org.freedesktop.DBus",
                          "/org/freedesktop/DBus", "org.freedesktop.DBus.ListNames"],
                         capture_output=True, text=True, timeout=20)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


def socket_path(address: str) -> str:
    assert address.startswith("unix:path="), address
    return address[len("unix:path=") :].split(",", maxsplit=1)[0]


class Forked:
    """`<daemon> --fork --print-address=8 --print-pid=9 --config-file=F [args] 8>addr 9>pid [stdio closed]`,
    through sh exactly as test-dbus-daemon-fork.sh does."""

    def __init__(self, tmp_path: Path, conf: Path, *args: str, closed: str = "", daemon: str = SEALBUS_DD,
                 fork_arg: str = "--fork"):  # fmt: skip
        self.addr_file, self.pid_file = tmp_path / "address", tmp_path / "pid"
        argv = " ".join([daemon, fork_arg, "--print-address=8", "--print-pid=9", f"--config-file={conf}", *args])
        redirect = {"": "", "stdin": "<&-", "all": "<&- >&- 2>&-"}[closed]
        cmd = f'{argv} 8>"{self.addr_file}" 9>"{self.pid_file}" {redirect}'
        self.started = time.monotonic()
        self.run = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=60)
        self.pid = int(self.pid_file.read_text() or 0) if self.pid_file.exists() else 0
        self.address = self.addr_file.read_text().strip() if self.addr_file.exists() else ""

    def stop(self) -> None:
        if self.pid and alive(self.pid):
            os.kill(self.pid, signal.SIGTERM)
            if not wait_gone(self.pid):
                os.kill(self.pid, signal.SIGKILL)
                wait_gone(self.pid)


@pytest.fixture
def forked():
    started = []

    def start(*args, **kw):
        f = Forked(*args, **kw)
        started.append(f)
        return f

    yield start
    for f in started:
        f.stop()


# -- --fork ---------------------------------------------------------------------------------------------


@needs_dbus_send
@pytest.mark.parametrize("closed", ["", "stdin", "all"])
def test_fork_detaches_a_working_bus(tmp_path, forked, closed):
    """The parent exits 0 once the bus serves, having printed a working address and the pid of a detached
    bus (its own session), with stdio open, stdin closed, or stdin/stdout/stderr closed; <pidfile> holds
    that pid; SIGTERM to it stops the bus, removes the socket and the pid file."""
    pidfile = tmp_path / "bus.pid"
    conf = write_conf(tmp_path, f"<pidfile>{pidfile}</pidfile>")
    f = forked(tmp_path, conf, closed=closed)
    assert f.run.returncode == 0, (f.run.stdout, f.run.stderr)
    assert f.address.startswith("unix:path=") and ",guid=" in f.address, f.address
    assert f.pid and f.pid != os.getpid() and alive(f.pid)
    assert os.getsid(f.pid) == f.pid  # detached: a session of its own, as dbus-daemon's setsid()
    assert os.readlink(f"/proc/{f.pid}/cwd") == "/"
    assert pidfile.read_text().strip() == str(f.pid)
    assert ":1." in list_names(f.address)
    path = socket_path(f.address)
    assert os.path.exists(path)
    os.kill(f.pid, signal.SIGTERM)
    assert wait_gone(f.pid)
    assert not os.path.exists(path)
    assert not pidfile.exists()


@needs_dbus_send
def test_fork_from_config_and_nopidfile(tmp_path, forked):
    """<fork/> in the config forks without --fork (and --nofork wins over it); --nopidfile: no pid file."""
    pidfile = tmp_path / "bus.pid"
    conf = write_conf(tmp_path, f"<fork/><pidfile>{pidfile}</pidfile>")
    f = forked(tmp_path, conf, "--nopidfile", fork_arg="")
    assert f.run.returncode == 0, f.run.stderr
    assert alive(f.pid) and os.getsid(f.pid) == f.pid
    assert not pidfile.exists()
    list_names(f.address)
    # --nofork wins over <fork/>: the process serves in the foreground
    proc = subprocess.Popen([SEALBUS_DD, f"--config-file={conf}", "--nofork", "--nopidfile", "--print-address=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        address = proc.stdout.readline().strip()
        assert address.startswith("unix:path=") and proc.poll() is None
        list_names(address)
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_existing_pidfile_refuses_start(tmp_path):
    """As dbus-daemon: a pid file that exists stops start-up, with its reason, and is left alone."""
    pidfile = tmp_path / "bus.pid"
    pidfile.write_text("1\n")
    conf = write_conf(tmp_path, f"<pidfile>{pidfile}</pidfile>")
    for daemon in (DBUS_DAEMON, SEALBUS_DD):
        out = subprocess.run([daemon, f"--config-file={conf}", "--fork", "--print-address=1"],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        assert out.returncode != 0 and "pid file" in out.stderr, (daemon, out.stderr)
        assert pidfile.read_text() == "1\n"


@pytest.mark.parametrize("fork", ["--fork", "--nofork"])
def test_unwritable_pidfile_stops_start_up(tmp_path, fork):
    """As dbus-daemon: a pid file that cannot be written stops start-up (status 1, the reason on stderr);
    with --fork the parent reports it and the socket is gone."""
    conf = write_conf(tmp_path, f"<pidfile>{tmp_path}/missing/bus.pid</pidfile>")
    out = subprocess.run(
        [SEALBUS_DD, f"--config-file={conf}", fork, "--print-address=1"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "DBUS_DEBUG_OUTPUT": "1"},
    )
    assert out.returncode == 1 and "pid file" in out.stderr, out.stderr
    assert not out.stdout
    assert os.listdir(tmp_path / "sock") == []


@needs_dbus_send
def test_fork_as_root_with_user_prints_the_launcher(tmp_path, forked, test_users):
    """Root with <user>: the forked process is the launcher (pid printed, pid file), the bus is served by a
    broker running as <user>; SIGTERM to the printed pid stops both."""
    user = test_users[0]
    pidfile = tmp_path / "bus.pid"
    allow_root = '<policy context="default"><allow user="*"/></policy>'  # a bus running as <user> admits only it
    conf = write_conf(tmp_path, f"<user>{user.pw_name}</user><pidfile>{pidfile}</pidfile>{allow_root}")
    f = forked(tmp_path, conf, closed="all")
    assert f.run.returncode == 0, f.run.stderr
    assert alive(f.pid) and os.stat(f"/proc/{f.pid}").st_uid == 0
    assert pidfile.read_text().strip() == str(f.pid)
    out = subprocess.run(["dbus-send", f"--bus={f.address}", "--print-reply", "--dest=org.freedesktop.DBus",
                          "/org/freedesktop/DBus", "org.freedesktop.DBus.GetConnectionUnixProcessID",
                          "string:org.freedesktop.DBus"], capture_output=True, text=True, timeout=20)  # fmt: skip
    assert out.returncode == 0, out.stderr
    broker = int(out.stdout.split()[-1])
    assert broker != f.pid and os.stat(f"/proc/{broker}").st_uid == user.pw_uid
    os.kill(f.pid, signal.SIGTERM)
    assert wait_gone(f.pid) and wait_gone(broker)
    assert not pidfile.exists()


# -- addresses --------------------------------------------------------------------------------------------


def _first_address(daemon: str, conf: Path) -> str:
    proc = subprocess.Popen([daemon, f"--config-file={conf}", "--nofork", "--print-address=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        return proc.stdout.readline().strip()
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_tmpdir_gives_a_path_address(tmp_path):
    """unix:tmpdir=DIR: a socket file in DIR, announced as unix:path= (dbus-daemon 1.14), not abstract."""
    conf = write_conf(tmp_path)
    for daemon in (DBUS_DAEMON, SEALBUS_DD):
        address = _first_address(daemon, conf)
        path = socket_path(address)
        assert os.path.dirname(path) == str(tmp_path / "sock"), (daemon, address)
        assert os.path.basename(path).startswith("dbus-")


# -- limits -------------------------------------------------------------------------------------------------


class RawConn:
    """A connection that authenticates (EXTERNAL, our uid) and sends Hello; keeps the socket open."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(socket_path(address))
        self.sock.sendall(b"\0" + make_auth_external())
        line = self.sock.recv(4096)
        assert line.startswith(b"OK "), line
        self.sock.sendall(BEGIN + message_bus.Hello().serialise(serial=1))
        parser = Parser()
        while (msg := parser.get_next_message()) is None:
            data = self.sock.recv(65536)
            assert data, "closed without an answer to Hello"
            parser.add_data(data)
        self.reply = msg

    def call(self, msg):
        """Send ``msg`` and return the bus's answer to it (nothing else arrives on this connection)."""
        self.serial = getattr(self, "serial", 1) + 1
        self.sock.sendall(msg.serialise(serial=self.serial))
        parser = Parser()
        while (reply := parser.get_next_message()) is None:
            data = self.sock.recv(65536)
            assert data, "closed without an answer"
            parser.add_data(data)
        return reply

    @property
    def error(self) -> str | None:
        if self.reply.header.message_type != MessageType.error:
            return None
        return self.reply.header.fields[HeaderFields.error_name]


@pytest.fixture
def bus_with(tmp_path):
    procs = []

    def start(limits: dict[str, int], daemon: str = SEALBUS_DD) -> str:
        extra = "".join(f'<limit name="{k}">{v}</limit>' for k, v in limits.items())
        conf = write_conf(tmp_path, extra, name=f"bus{len(procs)}.conf")
        proc = subprocess.Popen([daemon, f"--config-file={conf}", "--nofork", "--print-address=1"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
        procs.append(proc)
        return proc.stdout.readline().strip()

    yield start
    for p in procs:
        p.terminate()
        p.wait(timeout=15)


@pytest.mark.parametrize("limit", ["max_completed_connections", "max_connections_per_user"])
@pytest.mark.parametrize("daemon", [DBUS_DAEMON, SEALBUS_DD], ids=["dbus-daemon", "sealbus"])
def test_connection_limit_answers_hello_with_limits_exceeded(bus_with, limit, daemon):
    """Over the limit the connection authenticates and Hello gets LimitsExceeded (not a closed socket);
    root is counted by max_connections_per_user too; a slot freed is usable again."""
    address = bus_with({limit: 2}, daemon)
    first, second = RawConn(address), RawConn(address)
    assert first.error is None and second.error is None
    third = RawConn(address)
    assert third.error == LIMITS_EXCEEDED
    third.sock.close()
    gone = second.reply.body[0]
    second.sock.close()
    # the bus has processed the hang-up once the name is gone (asked on the connection that stays)
    assert wait_until(lambda: first.call(message_bus.NameHasOwner(gone)).body == (False,), timeout=20)
    again = RawConn(address)
    assert again.error is None


def test_root_is_counted_by_max_connections_per_user(bus_with):
    if os.geteuid() != 0:
        pytest.skip("needs root: shows uid 0 is not exempt")
    address = bus_with({"max_connections_per_user": 1, "max_completed_connections": 100})
    held = RawConn(address)
    assert held.error is None
    assert RawConn(address).error == LIMITS_EXCEEDED


@pytest.mark.parametrize("daemon", [DBUS_DAEMON, SEALBUS_DD], ids=["dbus-daemon", "sealbus"])
def test_max_names_per_connection_counts_the_unique_name(bus_with, daemon):
    from jeepney.io.blocking import open_dbus_connection

    address = bus_with({"max_names_per_connection": 3}, daemon)
    with open_dbus_connection(address) as c:
        got = [c.send_and_get_reply(message_bus.RequestName(f"com.example.N{i}")) for i in range(3)]
    assert [m.header.message_type for m in got[:2]] == [MessageType.method_return] * 2
    assert got[2].header.fields.get(HeaderFields.error_name) == LIMITS_EXCEEDED


# every <limit> name dbus-daemon 1.14 accepts (bus/config-parser.c)
DBUS_DAEMON_LIMITS = ["max_incoming_bytes", "max_incoming_unix_fds", "max_outgoing_bytes", "max_outgoing_unix_fds",
                      "max_message_size", "max_message_unix_fds", "service_start_timeout", "auth_timeout",
                      "pending_fd_timeout", "reply_timeout", "max_completed_connections",
                      "max_incomplete_connections", "max_connections_per_user", "max_pending_service_starts",
                      "max_names_per_connection", "max_match_rules_per_connection", "max_replies_per_connection",
                      "max_containers", "max_containers_per_user", "max_container_metadata_bytes",
                      "max_connections_per_container"]  # fmt: skip


@needs_dbus_send
def test_every_dbus_daemon_limit_name_is_accepted(tmp_path):
    """A config naming each limit dbus-daemon accepts starts both; the ones sealbus has nothing to bound
    with (no Containers1 interface) say so in the log."""
    extra = "".join(f'<limit name="{n}">{30000 if "timeout" in n else 1000}</limit>' for n in DBUS_DAEMON_LIMITS)
    conf = write_conf(tmp_path, extra)
    assert _first_address(DBUS_DAEMON, conf).startswith("unix:")
    log = tmp_path / "log"
    with open(log, "w") as err:
        proc = subprocess.Popen([SEALBUS_DD, f"--config-file={conf}", "--nofork", "--print-address=1"],
                                stdout=subprocess.PIPE, stderr=err, text=True)  # fmt: skip
    try:
        address = proc.stdout.readline().strip()
        assert address.startswith("unix:path="), log.read_text()
        list_names(address)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    text = log.read_text()
    for name in ("max_containers", "max_containers_per_user", "max_container_metadata_bytes",
                 "max_connections_per_container"):  # fmt: skip
        assert f"'{name}'> accepted, but it has nothing to bound" in text, text
    from broker.bus.limits import Limits

    assert set(DBUS_DAEMON_LIMITS) <= set(Limits.names())


# -- Features -----------------------------------------------------------------------------------------------


@needs_dbus_send
@pytest.mark.parametrize("daemon", [DBUS_DAEMON, SEALBUS_DD], ids=["dbus-daemon", "sealbus"])
def test_features_name_systemd_activation(tmp_path, daemon):
    conf = write_conf(tmp_path)
    for args, expected in (((), False), (("--systemd-activation",), True)):
        proc = subprocess.Popen([daemon, f"--config-file={conf}", "--nofork", "--print-address=1", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
        try:
            address = proc.stdout.readline().strip()
            out = subprocess.run(["dbus-send", f"--bus={address}", "--print-reply", "--dest=org.freedesktop.DBus",
                                  "/org/freedesktop/DBus", "org.freedesktop.DBus.Properties.Get",
                                  "string:org.freedesktop.DBus", "string:Features"],
                                 capture_output=True, text=True, timeout=20)  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(timeout=15)
        assert out.returncode == 0, out.stderr
        assert ('"HeaderFiltering"' in out.stdout) and (('"SystemdActivation"' in out.stdout) == expected), out.stdout


# -- the reference implementation's own tests --------------------------------------------------------------

needs_dbus_tests = pytest.mark.skipif(
    not os.path.exists(f"{DBUS_TESTS}/test-dbus-daemon"),
    reason=f"Debian's dbus-tests package is not installed ({DBUS_TESTS})",
)


def _dbus_tests_env(tmp_path: Path) -> dict:
    home = tmp_path / "home"
    (home / "rt").mkdir(parents=True)
    (home / "rt").chmod(0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBUS_")}
    env.update(DBUS_TEST_EXEC=DBUS_TESTS, DBUS_TEST_DATA=f"{DBUS_TESTS}/data", DBUS_TEST_DAEMON=SEALBUS_DD,
               HOME=str(home), XDG_RUNTIME_DIR=str(home / "rt"), DBUS_TEST_HOMEDIR=str(home))  # fmt: skip
    return env


def _kill_leftover_daemons(before: set[int]) -> None:
    """A failing case may leave a bus it started behind: stop those (only ones started during the test)."""
    for pid in _sealbus_daemons() - before:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _sealbus_daemons() -> set[int]:
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if SEALBUS_DD.encode() in f.read():
                        out.add(int(d))
            except OSError:
                pass
    return out


@needs_dbus_tests
@pytest.mark.parametrize("case", ["/limits/max-completed-connections", "/limits/max-connections-per-user",
                                  "/limits/max-names-per-connection", "/properties/features",
                                  "/properties/get-all"])  # fmt: skip
def test_dbus_tests_daemon_cases(tmp_path, case):
    before = _sealbus_daemons()
    try:
        out = subprocess.run([f"{DBUS_TESTS}/test-dbus-daemon", "-p", case, "--tap"], env=_dbus_tests_env(tmp_path),
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    finally:
        _kill_leftover_daemons(before)
    assert out.returncode == 0 and f"ok 1 {case}" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]


@needs_dbus_tests
@needs_dbus_send
def test_dbus_tests_fork_script(tmp_path):
    """test-dbus-daemon-fork.sh: --fork with stdio open, stdin closed, stdin/stdout/stderr closed."""
    before = _sealbus_daemons()
    try:
        out = subprocess.run(["sh", f"{DBUS_TESTS}/test-dbus-daemon-fork.sh"], env=_dbus_tests_env(tmp_path),
                             capture_output=True, text=True, timeout=180)  # fmt: skip
    finally:
        _kill_leftover_daemons(before)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert [ln.split(" - ")[0] for ln in out.stdout.splitlines() if ln.startswith("ok ")] == ["ok 1", "ok 2", "ok 3"]


def test_refused_connection_waiting_for_hello_is_closed_after_auth_timeout(bus_with):
    """A connection over the limit stays open only to have its Hello answered: one that authenticates and
    never sends Hello is closed when auth_timeout runs out (it stays an incomplete connection, never a
    peer), so waiting costs what an unauthenticated socket costs."""
    address = bus_with({"max_connections_per_user": 1, "auth_timeout": 1500})
    held = RawConn(address)
    assert held.error is None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(socket_path(address))
    s.sendall(b"\0" + make_auth_external())
    assert s.recv(4096).startswith(b"OK ")
    start = time.monotonic()
    s.sendall(BEGIN)
    s.settimeout(0.5)
    with pytest.raises(TimeoutError):  # not closed at once: it may still ask (Hello) why it is refused
        s.recv(1)
    s.settimeout(10)
    assert s.recv(1) == b""  # closed when auth_timeout is over
    assert 1.0 < time.monotonic() - start < 6


def test_refused_connection_reads_no_more_than_a_hello(bus_with):
    """The refused connection's one message is a Hello-sized one: a first message over 4 KiB closes it
    without an answer (the broker buffers no more for it than for SASL lines)."""
    from jeepney import DBusAddress, new_method_call

    address = bus_with({"max_connections_per_user": 1})
    held = RawConn(address)
    assert held.error is None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(socket_path(address))
    s.sendall(b"\0" + make_auth_external())
    assert s.recv(4096).startswith(b"OK ")
    big = new_method_call(DBusAddress("/org/freedesktop/DBus", "org.freedesktop.DBus", "org.freedesktop.DBus"),
                          "Hello", "s", ("x" * 8192,))  # fmt: skip
    s.sendall(BEGIN + big.serialise(serial=1))
    try:
        assert s.recv(65536) == b""  # closed, nothing answered
    except ConnectionResetError:
        pass  # closed with the rest of the message unread
    assert RawConn(address).error == LIMITS_EXCEEDED  # a real Hello still gets its answer


def test_pidfile_planted_as_a_symlink_is_never_followed(tmp_path):
    """A pid file path pointing (dangling) at another file: the bus refuses to start and writes nothing there."""
    victim = tmp_path / "victim"
    pidfile = tmp_path / "bus.pid"
    pidfile.symlink_to(victim)  # dangling: a plain exists() check would miss it
    conf = write_conf(tmp_path, f"<pidfile>{pidfile}</pidfile>")
    out = subprocess.run([SEALBUS_DD, f"--config-file={conf}", "--nofork", "--print-address=1"],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.returncode != 0 and "pid file" in out.stderr, out.stderr
    assert not victim.exists() and pidfile.is_symlink()
