"""Bus activation against real buses, real service files and real processes.

A session-style bus (`sealbus run --config`, no launcher: the session spawn
helper starts services as the bus's uid) and, as root, the privilege-separated
system bus (`sealbus run --system`: the broker asks the root launcher for a
name, the launcher starts Exec= as User=). The service is
tests/activation_service.py; each run writes NAME.started in a marker
directory, so a test can tell whether anything was started at all.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from jeepney import DBusAddress, HeaderFields, MessageType, new_method_call
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection
from jeepney.low_level import MessageFlag

from .conftest import SEALBUS, CoreClient, terminate, wait_until

SERVICE = Path(__file__).with_name("activation_service.py")
E = "org.freedesktop.DBus.Error."

CONFIG = """<busconfig><type>{type}</type>
  <servicedir>{services}</servicedir>
  <policy context="default"><allow user="*"/><allow send_destination="*" eavesdrop="true"/>
  <allow eavesdrop="true"/><allow own="*"/>{deny}</policy>
  <limit name="service_start_timeout">{timeout}</limit>
  <limit name="max_pending_service_starts">{max_pending}</limit>
</busconfig>"""


class ActivatingBus:
    """A bus with a service directory of its own and a marker directory. The bus starts when its
    ``address`` is first asked for: the service files written before are the ones it knows (a file added
    later needs ReloadConfig, as with dbus-daemon's inotify-less directories)."""

    def __init__(self, *, system: bool = False, deny: str = "", timeout: int = 25000, max_pending: int = 512,
                 services: dict | None = None):  # fmt: skip
        self.dir = Path(tempfile.mkdtemp(prefix="sealbus-act-"))
        self.dir.chmod(0o755)
        self.services = self.dir / "services"
        self.markers = self.dir / "markers"
        self.services.mkdir()
        self.markers.mkdir()
        self.markers.chmod(0o777)
        self.config = self.dir / "bus.conf"
        self.config.write_text(CONFIG.format(type="system" if system else "session", services=self.services,
                                             deny=deny, timeout=timeout, max_pending=max_pending))  # fmt: skip
        for name, kw in (services or {}).items():  # those the launcher must know of when it starts
            self.write_service(name, **kw)
        self.log = open(self.dir / "bus.log", "w+")
        self.system = system
        self.proc = self._address = None

    @property
    def address(self) -> str:
        if self.proc is None:
            if self.system:
                runtime = self.dir / "run"
                runtime.mkdir()
                argv = [SEALBUS, "run", "--system", "--runtime-dir", str(runtime), "--config", str(self.config)]
            else:
                argv = [SEALBUS, "run", "--address", f"unix:path={self.dir}/bus", "--config", str(self.config)]
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log, text=True)
            self._address = self.proc.stdout.readline().strip()
            assert self._address.startswith("unix:path="), self.logtext()
        return self._address

    def write_service(self, name: str, exec_line: str | None = None, user: str | None = None,
                      file_name: str | None = None) -> None:  # fmt: skip
        if exec_line is None:
            exec_line = f"{sys.executable} {SERVICE} {name} {self.markers}"
        text = f"[D-BUS Service]\nName={name}\nExec={exec_line}\n" + (f"User={user}\n" if user else "")
        (self.services / (file_name or f"{name}.service")).write_text(text)

    def started(self, name: str) -> bool:
        return (self.markers / f"{name}.started").exists()

    def logtext(self) -> str:
        self.log.flush()
        return (self.dir / "bus.log").read_text()

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, timeout=15)
        self.log.close()


@pytest.fixture
def session_bus():
    bus = ActivatingBus()
    yield bus
    bus.stop()


def call(conn, dest: str, member: str, signature: str = "", body=(), flags: int = 0, iface="org.example.Svc"):
    msg = new_method_call(DBusAddress("/org/example/Svc", bus_name=dest, interface=iface), member, signature, body)
    msg.header.flags |= flags
    return conn.send_and_get_reply(msg, timeout=60)


def error_name(reply) -> str | None:
    if reply.header.message_type == MessageType.error:
        return reply.header.fields[HeaderFields.error_name]
    return None


def start_by_name(conn, name: str):
    return conn.send_and_get_reply(message_bus.StartServiceByName(name), timeout=60)


# -- StartServiceByName and auto-start -------------------------------------------------------------


def test_start_service_by_name_answers_started_then_already_running(session_bus):
    session_bus.write_service("org.example.Svc")
    with open_dbus_connection(session_bus.address) as c:
        assert start_by_name(c, "org.example.Svc").body == (1,)  # DBUS_START_REPLY_SUCCESS
        assert session_bus.started("org.example.Svc")
        assert c.send_and_get_reply(message_bus.NameHasOwner("org.example.Svc")).body == (True,)
        assert start_by_name(c, "org.example.Svc").body == (2,)  # DBUS_START_REPLY_ALREADY_RUNNING
        reply = start_by_name(c, "org.example.NoSuchService")
        assert error_name(reply) == E + "ServiceUnknown"


def test_auto_start_queues_calls_and_delivers_them_in_order(session_bus):
    """Calls sent before the service exists wait for it, and it receives them in the order they were sent."""
    session_bus.write_service("org.example.Svc")
    with open_dbus_connection(session_bus.address) as c:
        serials = []
        for i in range(5):
            msg = new_method_call(DBusAddress("/org/example/Svc", bus_name="org.example.Svc",
                                              interface="org.example.Svc"), "Echo", "s", (f"call {i}",))  # fmt: skip
            serials.append(_send(c, msg))
        replies = {}
        while len(replies) < 5:
            m = c.receive(timeout=60)
            rs = m.header.fields.get(HeaderFields.reply_serial)
            if rs in serials:
                replies[rs] = m
    for i, s in enumerate(serials):
        assert replies[s].header.message_type == MessageType.method_return, replies[s]
        assert replies[s].body == (f"call {i}", i)  # its text, and i calls answered before it
    assert session_bus.logtext().count("activating service name='org.example.Svc'") == 1  # one start for five


def _send(conn, msg) -> int:
    serial = next(conn.outgoing_serial)
    conn.send(msg, serial=serial)
    return serial


def test_no_auto_start_flag_gets_name_has_no_owner_and_starts_nothing(session_bus):
    session_bus.write_service("org.example.Svc")
    session_bus.write_service("org.example.Other")
    with open_dbus_connection(session_bus.address) as c:
        reply = call(c, "org.example.Svc", "Echo", "s", ("x",), flags=MessageFlag.no_auto_start)
        assert error_name(reply) == E + "NameHasNoOwner"
        # a later start goes through the same spawn queue: had the first asked for one, it came first
        assert start_by_name(c, "org.example.Other").body == (1,)
    assert not session_bus.started("org.example.Svc")


def test_activated_service_gets_the_activation_environment(session_bus):
    session_bus.write_service("org.example.Svc")
    with open_dbus_connection(session_bus.address) as c:
        update = new_method_call(message_bus, "UpdateActivationEnvironment", "a{ss}", ({"SEALBUS_TEST": "42"},))
        assert c.send_and_get_reply(update).header.message_type == MessageType.method_return
        guid = c.send_and_get_reply(new_method_call(message_bus, "GetId")).body[0]
        info = call(c, "org.example.Svc", "Whoami").body[0]
    assert info["env:SEALBUS_TEST"] == "42"
    assert info["env:DBUS_STARTER_ADDRESS"] == f"{session_bus.address},guid={guid}"
    assert info["env:DBUS_STARTER_BUS_TYPE"] == "session"
    assert info["env:DBUS_SESSION_BUS_ADDRESS"] == info["env:DBUS_STARTER_ADDRESS"]


def test_update_activation_environment_rejects_malformed_names(session_bus):
    with open_dbus_connection(session_bus.address) as c:
        bad = new_method_call(message_bus, "UpdateActivationEnvironment", "a{ss}", ({"A=B": "x"},))
        assert error_name(c.send_and_get_reply(bad)) == E + "InvalidArgs"


# -- each way a start fails ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exec_line", "error"),
    [
        ("/bin/sh -c 'exit 3'", "Spawn.ChildExited"),
        ("/bin/sh -c 'kill -KILL $$'", "Spawn.ChildSignaled"),
        ("/nonexistent/sealbus-no-such-program", "Spawn.ExecFailed"),
        ("/bin/echo 'unterminated", "InvalidArgs"),
    ],
)
def test_failed_start_answers_every_waiter_with_dbus_daemons_error(session_bus, exec_line, error):
    session_bus.write_service("org.example.Svc", exec_line)
    with open_dbus_connection(session_bus.address) as c:
        assert error_name(call(c, "org.example.Svc", "Echo", "s", ("x",))) == E + error
        assert error_name(start_by_name(c, "org.example.Svc")) == E + error


def test_service_that_never_takes_its_name_times_out_and_is_killed():
    bus = ActivatingBus(timeout=1500)
    try:
        pidfile = bus.markers / "sleeper.pid"
        bus.write_service("org.example.Slow", f"/bin/sh -c 'echo $$ > {pidfile}; exec sleep 60'")
        with open_dbus_connection(bus.address) as c:
            reply = call(c, "org.example.Slow", "Echo", "s", ("x",))
        assert error_name(reply) == E + "TimedOut"
        assert "service_start_timeout=1500ms" in reply.body[0]
        pid = int(pidfile.read_text())
        assert wait_until(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid))
    finally:
        bus.stop()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except OSError:
        return True


# -- policy and bounds --------------------------------------------------------------------------


def test_denied_sender_cannot_make_the_bus_start_a_service():
    bus = ActivatingBus(deny='<deny send_destination="org.example.Denied"/>')
    try:
        bus.write_service("org.example.Denied")
        bus.write_service("org.example.Allowed")
        with open_dbus_connection(bus.address) as c:
            reply = call(c, "org.example.Denied", "Echo", "s", ("x",))
            assert error_name(reply) == E + "AccessDenied"
            # a start asked for after it is performed after it: had the denied call asked for one, it ran first
            assert start_by_name(c, "org.example.Allowed").body == (1,)
        assert bus.started("org.example.Allowed")
        assert not bus.started("org.example.Denied")
        assert "activating service name='org.example.Denied'" not in bus.logtext()
    finally:
        bus.stop()


def test_pending_starts_are_bounded_by_max_pending_service_starts():
    bus = ActivatingBus(max_pending=2, timeout=60000)
    try:
        bus.write_service("org.example.Slow", "/bin/sleep 60")
        with open_dbus_connection(bus.address) as c:
            for _ in range(2):
                _send(c, new_method_call(DBusAddress("/", bus_name="org.example.Slow", interface="org.example.Svc"),
                                         "Echo", "s", ("x",)))  # fmt: skip
            reply = start_by_name(c, "org.example.Slow")
        assert error_name(reply) == E + "LimitsExceeded"
        assert "max_pending_service_starts=2" in reply.body[0]
    finally:
        bus.stop()


class _Catalog(dict):
    """A catalog as the activator sees one: name -> entry."""


def _entry(name: str, exec_line: str = "/bin/true", unit: str | None = None):
    from types import SimpleNamespace

    return SimpleNamespace(name=name, exec=exec_line, user=None, systemd_service=unit, path=f"/x/{name}.service")


def test_core_bounds_waiters_per_uid_and_frees_them_with_their_peer(core):
    """Sans-IO: a non-root uid may hold a quarter of max_pending_service_starts; a peer that leaves takes
    its queued messages and its charges with it, and its queued fds are released."""
    core.limits.max_pending_service_starts = 8
    core.catalog = _Catalog({f"org.example.S{i}": _entry(f"org.example.S{i}") for i in range(4)})
    a, b = CoreClient(core, uid=1000), CoreClient(core, uid=1001)
    for i in range(2):
        a.call("Echo", "s", ("x",), dest=f"org.example.S{i}", path="/", interface="org.example.Svc")
    assert a.take() == [] and a.peer.account.pending_starts == 2
    a.call("Echo", "s", ("x",), dest="org.example.S2", path="/", interface="org.example.Svc")
    [(h, body)] = a.take()
    assert h.error_name == E + "LimitsExceeded" and "share of max_pending_service_starts=8" in body[0]
    b.call("Echo", "s", ("x",), dest="org.example.S2", path="/", interface="org.example.Svc")  # another uid: room
    assert b.take() == [] and core.activator.count == 3
    assert [s.name for s in core.activator.requests] == ["org.example.S0", "org.example.S1", "org.example.S2"]
    core.disconnect(a.peer)
    assert core.activator.count == 1 and a.peer.account.pending_starts == 0 and a.peer.account.start_bytes == 0
    assert all(not s.waiters for s in core.activator.pending.values() if s.name != "org.example.S2")


def test_core_systemd_activation_request_waits_for_systemd_and_failure_reaches_waiters(core):
    """Sans-IO: with systemd activation the bus asks systemd (queued until it is on the bus), and only
    systemd's own ActivationFailure fails the start."""
    core.activator.systemd = True
    core.catalog = _Catalog({"org.example.U": _entry("org.example.U", unit="dbus-org.example.U.service")})
    caller, systemd, forger = CoreClient(core), CoreClient(core, uid=os.getuid()), CoreClient(core, uid=os.getuid())
    caller.call("Echo", dest="org.example.U", path="/", interface="org.example.Svc")
    assert caller.take() == [] and core.activator.requests == []  # nothing to spawn: systemd's job
    systemd.call("RequestName", "su", ("org.freedesktop.systemd1", 4))
    got = [(h.member, body) for h, body in systemd.take() if h.member == "ActivationRequest"]
    assert got == [("ActivationRequest", ("dbus-org.example.U.service",))]
    failure = ("dbus-org.example.U.service", "com.example.Nope", "Computer says no")
    forger.signal("org.freedesktop.systemd1.Activator", "ActivationFailure", "sss", failure,
                  dest="org.freedesktop.DBus", path="/org/freedesktop/systemd1")  # fmt: skip
    assert caller.take() == []  # a forged failure is ignored
    systemd.signal("org.freedesktop.systemd1.Activator", "ActivationFailure", "sss", failure,
                   dest="org.freedesktop.DBus", path="/org/freedesktop/systemd1")  # fmt: skip
    [(h, body)] = caller.take()
    assert (h.error_name, body) == ("com.example.Nope", ("Computer says no",))


# -- the privilege-separated system bus: the launcher starts services as their User= ---------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the root launcher needs root")


@needs_root
def test_launcher_starts_the_service_as_its_user_with_a_clean_environment(test_users):
    user = test_users[0]
    services = {
        "org.example.Svc": {"user": user.pw_name},
        "org.example.NoUser": {"user": "sealbus-no-such-user"},
        "org.example.Fails": {"user": user.pw_name, "exec_line": "/bin/sh -c 'exit 7'"},
    }
    bus = ActivatingBus(system=True, services=services)
    try:
        with open_dbus_connection(bus.address) as c:
            info = call(c, "org.example.Svc", "Whoami").body[0]
            assert error_name(start_by_name(c, "org.example.NoUser")) == E + "Spawn.PermissionsInvalid"
            failed = call(c, "org.example.Fails", "Echo", "s", ("x",))  # the launcher reaps it, the broker tells
            assert (error_name(failed), failed.body) == (
                E + "Spawn.ChildExited",
                ("Process org.example.Fails exited with status 7",),
            )
            # a service file added later is seen after ReloadConfig, by the broker (catalogue) and the launcher
            bus.write_service("org.example.Late", user=user.pw_name)
            assert (
                c.send_and_get_reply(new_method_call(message_bus, "ReloadConfig")).header.message_type
                == MessageType.method_return
            )
            assert start_by_name(c, "org.example.Late").body == (1,)
            env = new_method_call(message_bus, "UpdateActivationEnvironment", "a{ss}", ({"LD_PRELOAD": "/x"},))
            assert error_name(c.send_and_get_reply(env)) == E + "AccessDenied"  # root too: never on a system bus
    finally:
        bus.stop()
    assert info["Uid"].split() == [str(user.pw_uid)] * 4
    assert info["Gid"].split() == [str(user.pw_gid)] * 4
    assert info["NoNewPrivs"] == "1"
    env = {k[4:]: v for k, v in info.items() if k.startswith("env:")}
    assert set(env) <= {"PATH", "DBUS_STARTER_ADDRESS", "DBUS_STARTER_BUS_TYPE", "DBUS_SYSTEM_BUS_ADDRESS",
                        "LC_CTYPE", "PWD"}, env  # fmt: skip
    assert env["DBUS_STARTER_BUS_TYPE"] == "system"
    assert env["DBUS_STARTER_ADDRESS"].startswith(bus.address + ",guid=")


@needs_root
def test_launcher_takes_names_only_and_checks_them_itself(tmp_path, test_users):
    """The control channel request: a compromised broker can name a service, nothing more. A command
    line or user in the request is ignored, a name that is not a valid bus name or has no service file is
    refused, and the file the launcher reads is its own."""
    from broker.launch.service_start import ServiceSpawner

    out = Path(tempfile.mkdtemp(prefix="sealbus-act-out-"))  # where the service (its User=) may write
    out.chmod(0o777)
    (tmp_path / "org.example.Svc.service").write_text(
        f"[D-BUS Service]\nName=org.example.Svc\nExec=/bin/sh -c 'touch {out}/ran'\nUser={test_users[0].pw_name}\n"
    )
    sent = []
    spawner = ServiceSpawner([str(tmp_path)], sent.append)
    marker = tmp_path / "pwned"
    for i, name in enumerate(("../../etc/passwd", "org.example.Missing", ":1.5", 42)):
        spawner.handle({"type": "start", "name": name, "id": i, "exec": f"/bin/touch {marker}", "user": "root"})
    assert [m["error"].rsplit(".", 1)[1] for m in sent] == ["ServiceNotValid", "ServiceNotFound",
                                                            "ServiceNotValid", "ServiceNotValid"]  # fmt: skip
    spawner.handle({"type": "start", "name": "org.example.Svc", "id": 9, "exec": f"/bin/touch {marker}",
                    "user": "root"})  # fmt: skip
    assert wait_until(lambda: (spawner.reap(), not spawner.children)[1])
    assert sent[-1] == {"type": "start_result", "name": "org.example.Svc", "id": 9, "status": 0}
    assert (out / "ran").exists() and not marker.exists()
    assert (out / "ran").stat().st_uid == test_users[0].pw_uid


def test_core_queued_bytes_are_bounded_per_sending_uid(core):
    """Sans-IO: what waits for a service counts against the sender's max_outgoing_bytes_per_user."""
    core.limits.max_outgoing_bytes_per_user = 4096
    core.catalog = _Catalog({"org.example.S": _entry("org.example.S")})
    a = CoreClient(core, uid=1000)
    a.call("Echo", "s", ("x" * 1500,), dest="org.example.S", path="/", interface="org.example.Svc")
    a.call("Echo", "s", ("x" * 1500,), dest="org.example.S", path="/", interface="org.example.Svc")
    assert a.take() == [] and a.peer.account.start_bytes > 3000
    a.call("Echo", "s", ("x" * 1500,), dest="org.example.S", path="/", interface="org.example.Svc")
    [(h, body)] = a.take()
    assert h.error_name == E + "LimitsExceeded" and "max_outgoing_bytes_per_user" in body[0]
    assert core.activator.count == 2


def test_core_update_activation_environment_is_for_the_bus_owner_only(core):
    """Sans-IO: another uid cannot choose what the bus's services run with (LD_PRELOAD and friends)."""
    other, owner = CoreClient(core, uid=os.getuid() + 1000), CoreClient(core, uid=os.getuid())
    other.call("UpdateActivationEnvironment", "a{ss}", ({"LD_PRELOAD": "/tmp/evil.so"},))
    [(h, _)] = other.take()
    assert h.error_name == E + "AccessDenied" and core.activator.env == {}
    owner.call("UpdateActivationEnvironment", "a{ss}", ({"FOO": "bar"},))
    assert owner.take()[0][0].type == 2 and core.activator.environment()["FOO"] == "bar"


@needs_root
def test_launcher_kills_a_service_whose_start_timed_out(test_users):
    """The broker's service_start_timeout reaches the launcher as a stop for that name: its child is killed."""
    user = test_users[0]
    bus = ActivatingBus(system=True, timeout=2000, services={})
    pidfile = bus.markers / "slow.pid"
    bus.write_service("org.example.Slow", f"/bin/sh -c 'echo $$ > {pidfile}; exec sleep 60'", user=user.pw_name)
    try:
        with open_dbus_connection(bus.address) as c:
            reply = start_by_name(c, "org.example.Slow")
        assert error_name(reply) == E + "TimedOut"
        pid = int(pidfile.read_text())
        assert wait_until(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid))
        assert "its start timed out" in bus.logtext()
    finally:
        bus.stop()


def test_core_ignores_a_launcher_answer_about_an_earlier_start(core):
    """Sans-IO: the launcher's answers name the start they are about; a late one (the process of a start that
    timed out, killed since) does not fail the name's next start."""
    from broker.io.activation import apply_start_result

    core.catalog = _Catalog({"org.example.S": _entry("org.example.S")})
    a = CoreClient(core)
    a.call("Echo", dest="org.example.S", path="/", interface="org.example.Svc")
    ident = core.activator.pending["org.example.S"].ident
    apply_start_result(core, {"type": "start_result", "name": "org.example.S", "id": ident - 1, "status": -9})
    assert a.take() == [] and "org.example.S" in core.activator.pending
    apply_start_result(core, {"type": "start_result", "name": "org.example.S", "id": ident, "status": 3})
    [(h, body)] = a.take()
    assert (h.error_name, body) == (E + "Spawn.ChildExited", ("Process org.example.S exited with status 3",))
