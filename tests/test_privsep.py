"""`sealbus run --system`: root launcher, broker as the bus user with nothing left to lose."""

import grp
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from jeepney import HeaderFields, Properties, message_bus
from jeepney.io.blocking import open_dbus_connection

from .conftest import SEALBUS, popen_as, run_as, terminate
from .procfs import children, proc_status

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the privilege-separated system bus needs root")

PERMISSIVE = """<busconfig><type>system</type>
  <policy context="default"><allow user="*"/><allow send_destination="*" eavesdrop="true"/>
  <allow eavesdrop="true"/><allow own="*"/>{extra}</policy>{top}</busconfig>"""


class SystemBus:
    def __init__(self, extra_policy: str = "", extra_args: tuple = (), extra_config: str = ""):
        self.runtime = Path(tempfile.mkdtemp(prefix="sealbus-rt-"))
        os.chmod(self.runtime, 0o755)
        self.config = self.runtime.parent / (self.runtime.name + ".conf")
        self.config.write_text(PERMISSIVE.format(extra=extra_policy, top=extra_config))
        self.log = open(str(self.runtime) + ".log", "w+")
        self.proc = subprocess.Popen([SEALBUS, "run", "--system", "--runtime-dir", str(self.runtime),
                                      "--config", str(self.config), *extra_args],
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)  # fmt: skip
        self.address = self.proc.stdout.readline().strip()
        assert self.address.startswith("unix:path="), self.logtext()
        self.socket = Path(self.address.split("=", 1)[1])
        kids = children(self.proc.pid)
        assert len(kids) == 1, kids
        self.broker_pid = kids[0]

    def logtext(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def stop(self) -> int:
        return terminate(self.proc, timeout=15)


@pytest.fixture
def system_bus():
    bus = SystemBus()
    yield bus
    bus.stop()


def assert_confined(pid: int, user: pwd.struct_passwd) -> None:
    """The process runs as ``user`` with no capability in any set, no_new_privs and a seccomp filter."""
    st = proc_status(pid)
    assert st["Uid"].split() == [str(user.pw_uid)] * 4
    assert st["Gid"].split() == [str(user.pw_gid)] * 4
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[cap], 16) == 0, (cap, st[cap])
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"
    assert st["Groups"] == ""


def test_broker_runs_as_bus_user_without_privileges(system_bus):
    assert_confined(system_bus.broker_pid, pwd.getpwnam("sealbus"))


def test_clients_of_several_uids_talk(system_bus, test_users):
    owner = open_dbus_connection(system_bus.address)
    assert owner.send_and_get_reply(message_bus.RequestName("org.sealbus.Sys")).body[0] == 1
    script = ("from jeepney.io.blocking import open_dbus_connection\nfrom jeepney import message_bus\n"
              f"c = open_dbus_connection({system_bus.address!r})\n"
              "print(c.send_and_get_reply(message_bus.GetNameOwner('org.sealbus.Sys')).body[0])")  # fmt: skip
    for u in test_users:
        out = run_as(u, [sys.executable, "-c", script])
        assert out.stdout.strip() == owner.unique_name, out.stderr
    # the broker reports each client's real uid
    c = open_dbus_connection(system_bus.address)
    assert c.send_and_get_reply(message_bus.GetConnectionUnixUser(owner.unique_name)).body[0] == 0


def _socket_peer(path: str) -> tuple[int, int, int]:
    """(pid, uid, gid) that SO_PEERCRED reports for a fresh connection to the bus socket at path."""
    import socket
    import struct

    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        return struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))


def _busctl_status_pid(address: str) -> int:
    out = subprocess.run(["busctl", f"--address={address}", "status", "--no-pager"], capture_output=True,
                         text=True, timeout=30)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return int(next(line for line in out.stdout.splitlines() if line.startswith("PID=")).split("=")[1])


def test_clients_see_the_broker_as_the_bus_process(system_bus):
    """SO_PEERCRED on the bus socket names the broker (it calls listen() again), not the launcher that
    bound the socket, so busctl status and the driver's GetConnectionUnixProcessID/UnixUser agree (the
    broker starts as the bus user: that is the uid clients now see, as the driver already answered)."""
    pid, uid, _gid = _socket_peer(str(system_bus.socket))
    assert (pid, uid) == (system_bus.broker_pid, pwd.getpwnam("sealbus").pw_uid), (pid, system_bus.proc.pid)
    with open_dbus_connection(system_bus.address) as c:
        driver_pid = c.send_and_get_reply(message_bus.GetConnectionUnixProcessID("org.freedesktop.DBus")).body[0]
    assert driver_pid == system_bus.broker_pid
    if shutil.which("busctl"):
        assert _busctl_status_pid(system_bus.address) == system_bus.broker_pid


FUSE_DANCE = """
import hashlib, os, sys
from jeepney import DBusAddress, new_method_call
from jeepney.io.blocking import open_dbus_connection
from broker.client.payload import make_payload, snapshot_devices, trusted_kind
c = open_dbus_connection(sys.argv[1], enable_fds=True)
data = os.urandom(200_000)
fd, via = make_payload(data, c, via="fuse")
st = os.fstat(fd)
got = os.pread(fd, len(data) + 1, 0)
try:
    os.write(fd, b"x")
    writable = True
except OSError:
    writable = False
print(via, trusted_kind(fd, snapshot_devices(c)), got == data, oct(st.st_mode & 0o777), writable)
"""


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")
def test_sandboxed_broker_serves_the_launchers_payload_fs(system_bus, test_users):
    """The launcher mounts <runtime>/fs; the broker (no caps, Landlock, seccomp) serves it and Claim works
    for an unprivileged client: the whole FUSE dance through the real system bus."""
    mount = system_bus.runtime / "fs"
    assert any(line.split()[1] == str(mount) and line.split()[2] == "fuse.sealbus"
               for line in Path("/proc/mounts").read_text().splitlines())  # fmt: skip
    out = run_as(test_users[0], [sys.executable, "-c", FUSE_DANCE, system_bus.address], timeout=60)
    assert out.stdout.split() == ["fuse", "payload-snapshot", "True", "0o400", "False"], out.stderr
    # its contents lived in unlinked files of a directory of the runtime dir that only the bus user can use:
    # root's (the launcher has no CAP_CHOWN), the bus user's group, nobody else's bits
    (store,) = system_bus.runtime.glob("sealbus-store-*")
    st = store.stat()
    bus_user = pwd.getpwnam("sealbus")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, bus_user.pw_gid, 0o770)
    assert set(grp.getgrgid(st.st_gid).gr_mem) <= {bus_user.pw_name}  # no other member of that group
    assert list(store.iterdir()) == []
    assert system_bus.stop() == 0
    assert not any(str(mount) in line for line in Path("/proc/mounts").read_text().splitlines())  # unmounted
    assert not store.exists()


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")
def test_system_payload_fs_at_the_requested_place():
    parent = Path(tempfile.mkdtemp(prefix="sealbus-pfs-"))
    parent.chmod(0o755)  # every user reaches the payload fs, the bus user included
    where = parent / "payload"
    bus = SystemBus(extra_args=("--payload-fs", str(where)))
    try:
        assert any(line.split()[1] == str(where) and line.split()[2] == "fuse.sealbus"
                   for line in Path("/proc/mounts").read_text().splitlines())  # fmt: skip
    finally:
        assert bus.stop() == 0
    assert not any(str(where) in line for line in Path("/proc/mounts").read_text().splitlines())


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")
def test_unreachable_payload_fs_is_a_clear_start_up_error(tmp_path):
    """A payload fs the bus user cannot reach must stop start-up with the reason, never quietly drop Landlock."""
    with pytest.raises(AssertionError) as bad:
        SystemBus(extra_args=("--payload-fs", str(tmp_path / "payload")))  # tmp_path: root-only
    assert "the bus user must be able to reach it" in str(bad.value)
    assert "WITHOUT a filesystem sandbox" not in str(bad.value)
    assert not any(str(tmp_path) in line for line in Path("/proc/mounts").read_text().splitlines())


def test_sighup_reload_keeps_connections_and_applies_rules(system_bus):
    c = open_dbus_connection(system_bus.address)
    assert c.send_and_get_reply(message_bus.RequestName("org.sealbus.Before")).body[0] == 1
    system_bus.config.write_text(PERMISSIVE.format(extra='<deny own="org.sealbus.Forbidden"/>', top=""))
    system_bus.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "configuration reloaded" not in system_bus.logtext() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    reply = c.send_and_get_reply(message_bus.RequestName("org.sealbus.Forbidden"))
    assert reply.header.message_type.name == "error" and "AccessDenied" in str(reply.header.fields)
    # the same connection is still up and owns what it owned
    assert c.send_and_get_reply(message_bus.GetNameOwner("org.sealbus.Before")).body[0] == c.unique_name


SPAWN_EXITED = "org.freedesktop.DBus.Error.Spawn.ChildExited"


def test_systemd_activation_of_the_launcher_asks_systemd(tmp_path):
    """`run --system --systemd-activation` (sealbus-dbus.service): a SystemdService= entry is started by asking
    systemd (ActivationRequest to org.freedesktop.systemd1), not by spawning its Exec=; without it, Exec= runs."""
    services = tmp_path / "services"
    services.mkdir()
    tmp_path.chmod(0o755)
    (services / "org.sealbus.Sd.service").write_text(
        "[D-BUS Service]\nName=org.sealbus.Sd\nExec=/bin/false\nUser=root\nSystemdService=dbus-org.sealbus.Sd.service\n"
    )
    for args, asked in ((("--systemd-activation",), True), ((), False)):
        bus = SystemBus(extra_args=args, extra_config=f"<servicedir>{services}</servicedir>")
        try:
            systemd = open_dbus_connection(bus.address)
            assert systemd.send_and_get_reply(message_bus.RequestName("org.freedesktop.systemd1")).body[0] == 1
            features = systemd.send_and_get_reply(Properties(message_bus).get("Features")).body[0][1]
            assert ("SystemdActivation" in features) == asked, features
            client = open_dbus_connection(bus.address)
            if asked:
                client.send(message_bus.StartServiceByName("org.sealbus.Sd"))
                msg = systemd.receive(timeout=30)
                while msg.header.fields.get(HeaderFields.member) != "ActivationRequest":
                    msg = systemd.receive(timeout=30)
                assert msg.body == ("dbus-org.sealbus.Sd.service",)
            else:  # the launcher ran Exec=/bin/false, which exited before taking the name
                reply = client.send_and_get_reply(message_bus.StartServiceByName("org.sealbus.Sd"), timeout=30)
                assert reply.header.fields.get(HeaderFields.error_name) == SPAWN_EXITED, reply
        finally:
            bus.stop()


def _store_files(pid: int, store: Path) -> list[str]:
    """What the broker's fds point to inside its payload store directory."""
    links = (os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
    return [t for t in links if t.startswith(f"{store}/")]


def test_killed_broker_is_reported_and_cleaned_up():
    bus = SystemBus()
    c = open_dbus_connection(bus.address)
    (store,) = bus.runtime.glob("sealbus-store-*")
    held = None
    if (bus.runtime / "fs").is_mount():  # a payload being written lives in a nameless file of the store
        held = os.open(bus.runtime / "fs" / "tmp" / "p", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
        os.write(held, b"x" * 65536)
        (target,) = _store_files(bus.broker_pid, store)
        assert target.endswith("(deleted)") and list(store.iterdir()) == []
    os.kill(bus.broker_pid, signal.SIGKILL)
    assert bus.proc.wait(timeout=15) == 1
    assert "exited unexpectedly" in bus.logtext()
    assert not bus.socket.exists()
    assert not store.exists()  # the launcher removes the store directory; its files died with the broker
    if held is not None:
        os.close(held)
    with pytest.raises((ConnectionError, OSError, EOFError)):
        c.send_and_get_reply(message_bus.ListNames(), timeout=5)


def test_sigterm_stops_and_removes_socket():
    bus = SystemBus()
    assert bus.socket.exists()
    assert bus.stop() == 0
    assert not bus.socket.exists()
    assert not Path(f"/proc/{bus.broker_pid}").exists()


# -- the sandbox itself, exercised in a child process through the same code ------------------

SANDBOXED = """
import os, sys, errno
import pyseccomp
from broker.launch import sandbox
import pwd
u = pwd.getpwnam("sealbus")
sandbox.drop_privileges(u.pw_uid, u.pw_gid)
assert sandbox.apply_landlock(True) and sandbox.apply_seccomp(True)
what = sys.argv[1]
if what == "files":
    for path, flags in (("/etc/shadow", os.O_RDONLY), ("/etc/passwd", os.O_RDONLY),
                        (sys.argv[2] + "/new", os.O_WRONLY | os.O_CREAT)):
        try:
            os.open(path, flags, 0o600)
            print("OPENED", path)
        except PermissionError:
            print("denied", path)
    try:
        os.setresuid(0, 0, 0)
        print("BECAME ROOT")
    except PermissionError:
        print("setresuid denied")
elif what == "execve":
    os.execv("/bin/true", ["true"])
elif what == "ptrace":
    import ctypes
    ctypes.CDLL(None).ptrace(0, 0, 0, 0)
print("still alive")
"""


def sandboxed(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SANDBOXED, *args], capture_output=True, text=True, timeout=30)


def test_sandbox_denies_files_and_root(tmp_path):
    os.chmod(tmp_path, 0o777)
    out = sandboxed("files", str(tmp_path))
    assert out.stdout.split("\n")[:3] == ["denied /etc/shadow", "denied /etc/passwd", f"denied {tmp_path}/new"]
    # setresuid is not on the seccomp allowlist: trying it kills the process (SIGSYS)
    assert out.returncode == -signal.SIGSYS and "BECAME ROOT" not in out.stdout, (out.returncode, out.stdout)


@pytest.mark.parametrize("call", ["execve", "ptrace"])
def test_forbidden_syscall_kills(call):
    out = sandboxed(call)
    assert out.returncode == -signal.SIGSYS, (out.returncode, out.stdout, out.stderr)
    assert "still alive" not in out.stdout


# -- `sealbus dbus-daemon` honours <user>: as root, the same split and sandbox as --system ------------

DAEMON_CONF = """<busconfig><type>system</type>{user}<listen>unix:tmpdir=/tmp</listen><auth>EXTERNAL</auth>
  <policy context="default"><allow user="*"/><deny own="*"/><deny send_type="method_call"/>
  <allow send_type="signal"/><allow send_requested_reply="true" send_type="method_return"/>
  <allow send_requested_reply="true" send_type="error"/><allow receive_type="method_call"/>
  <allow receive_type="method_return"/><allow receive_type="error"/><allow receive_type="signal"/>
  <allow send_destination="org.freedesktop.DBus"/><allow own="org.sealbus.Daemon"/>
  <allow send_destination="org.sealbus.Daemon"/></policy></busconfig>"""


class DaemonBus:
    """`sealbus dbus-daemon --config-file=F --nofork --print-address=1 --print-pid=1 [args]`, the way
    dbus-daemon's own test programs start it (``as_user``: started by that user instead of root)."""

    def __init__(self, user: str | None, *args: str, as_user=None):
        self.dir = Path(tempfile.mkdtemp(prefix="sealbus-dd-"))
        self.dir.chmod(0o755)
        self.config = self.dir / "bus.conf"
        self.config.write_text(DAEMON_CONF.format(user=f"<user>{user}</user>" if user else ""))
        self.config.chmod(0o644)
        self.log = open(self.dir / "stderr", "w+")
        argv = [SEALBUS, "dbus-daemon", f"--config-file={self.config}", "--nofork", "--print-address=1",
                "--print-pid=1", *args]  # fmt: skip
        kw = dict(stdout=subprocess.PIPE, stderr=self.log, stdin=subprocess.DEVNULL, text=True)
        self.proc = subprocess.Popen(argv, **kw) if as_user is None else popen_as(as_user, argv, **kw)
        self.address = self.proc.stdout.readline().strip().split(",guid=")[0]
        assert self.address.startswith("unix:"), self.logtext()
        self.pid = int(self.proc.stdout.readline())
        assert self.pid == self.proc.pid  # --print-pid names the process to signal

    def serving_pid(self) -> int:
        """The process that answers on the socket: the bus driver reports its own pid."""
        with open_dbus_connection(self.address) as c:
            return c.send_and_get_reply(message_bus.GetConnectionUnixProcessID("org.freedesktop.DBus")).body[0]

    def logtext(self) -> str:
        self.log.flush()
        return (self.dir / "stderr").read_text()

    def stop(self) -> int:
        rc = terminate(self.proc, timeout=15)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        return rc


def _stats_caller(address: str) -> str:
    return ("from jeepney import DBusAddress, new_method_call\nfrom jeepney.io.blocking import open_dbus_connection\n"
            f"c = open_dbus_connection({address!r})\n"
            "r = c.send_and_get_reply(new_method_call(DBusAddress('/org/freedesktop/DBus', 'org.freedesktop.DBus', "
            "'org.freedesktop.DBus.Debug.Stats'), 'GetAllMatchRules'))\n"
            "print(r.header.message_type.name, r.header.fields.get(4, ''))")  # fmt: skip


@pytest.mark.skipif(shutil.which("dbus-send") is None, reason="no dbus-send")
def test_dbus_daemon_drop_in_serves_from_a_sandboxed_broker_as_config_user(test_users):
    bus_user, other = test_users
    sock = Path(tempfile.mkdtemp(prefix="sealbus-dd-sock-"))
    sock.chmod(0o755)
    bus = DaemonBus(bus_user.pw_name, f"--address=unix:path={sock}/bus", "--log-level=info")
    try:
        broker = bus.serving_pid()
        assert broker != bus.pid and children(bus.pid) == [broker]
        assert _socket_peer(f"{sock}/bus")[0] == broker  # what busctl status shows as the bus's PID
        if shutil.which("busctl"):
            assert _busctl_status_pid(bus.address) == broker
        assert_confined(broker, bus_user)
        assert (
            f"broker sandboxed: uid={bus_user.pw_uid} gid={bus_user.pw_gid} landlock=True seccomp=True" in bus.logtext()
        )
        # real clients, as root and as another user
        out = subprocess.run(["dbus-send", f"--bus={bus.address}", "--print-reply", "--dest=org.freedesktop.DBus",
                              "/org/freedesktop/DBus", "org.freedesktop.DBus.ListNames"],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        assert out.returncode == 0 and '"org.freedesktop.DBus"' in out.stdout, out.stderr
        if shutil.which("busctl"):
            out = run_as(other, ["busctl", f"--address={bus.address}", "list", "--no-pager"])
            assert out.returncode == 0 and "org.freedesktop.DBus" in out.stdout, out.stderr
        # Debug.Stats: the bus's own uid is now <user>'s; another uid is refused, root is not
        for who, expect in ((None, "method_return"), (bus_user, "method_return"), (other, "error")):
            argv = [sys.executable, "-c", _stats_caller(bus.address)]
            r = subprocess.run(argv, capture_output=True, text=True, timeout=30) if who is None else run_as(who, argv)
            assert r.stdout.split()[:1] == [expect], (who, r.stdout, r.stderr)
        assert "AccessDenied" in r.stdout
        assert bus.stop() == 0
        assert not Path(f"/proc/{broker}").exists() and not (sock / "bus").exists()
    finally:
        bus.stop()
        shutil.rmtree(sock, ignore_errors=True)


def test_dbus_daemon_unknown_user_is_a_one_line_start_up_error(tmp_path):
    conf = tmp_path / "bus.conf"
    conf.write_text(DAEMON_CONF.format(user="<user>sealbus-no-such-user</user>"))
    proc = subprocess.Popen([SEALBUS, "dbus-daemon", f"--config-file={conf}", "--nofork", "--print-address=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 1 and out == ""
    assert err.count("\n") == 1 and 'username "sealbus-no-such-user"' in err, err


def test_dbus_daemon_as_root_without_user_warns_and_stays_root():
    bus = DaemonBus(None)
    try:
        assert bus.serving_pid() == bus.pid and proc_status(bus.pid)["Uid"].split()[0] == "0"
        assert "names no <user>" in bus.logtext()
    finally:
        assert bus.stop() == 0


def test_dbus_daemon_not_root_with_another_user_keeps_the_invoking_user(test_users):
    """As dbus-daemon (built with libaudit, as distributions ship it): it cannot change user, so it
    keeps running as whoever started it; sealbus says so."""
    me, named = test_users
    bus = DaemonBus(named.pw_name, as_user=me)
    try:
        assert bus.serving_pid() == bus.pid and proc_status(bus.pid)["Uid"].split()[0] == str(me.pw_uid)
        assert f"<user>{named.pw_name}</user>" in bus.logtext() and "not started as root" in bus.logtext()
    finally:
        assert bus.stop() == 0
