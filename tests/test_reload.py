"""Reloading without dropping a connection (broker/io/reload.py): ReloadConfig, SIGHUP and inotify re-read
the configuration, its policy and the service directories, with real buses and real clients (dbus-send,
busctl, jeepney). Each live case runs on a bus that reads its own config (`sealbus run --config`) and, as
root, on the privilege-separated system bus (`sealbus run --system`), where the sandboxed broker asks the
root launcher, which re-reads and hands over the result."""

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from jeepney import DBusAddress, message_bus, new_method_call
from jeepney.io.blocking import open_dbus_connection

from broker.activation.catalog import ServiceCatalog
from broker.activation.service_file import ServiceFile
from broker.io import reload as reload_mod
from broker.io.reload import MAX_WAITERS, Reloader

from .conftest import SEALBUS, CoreClient, run_as, summarize, terminate, wait_until

needs_dbus_send = pytest.mark.skipif(shutil.which("dbus-send") is None, reason="no dbus-send")

POLICY = """<policy context="default"><allow user="*"/><allow send_destination="*" eavesdrop="true"/>
  <allow eavesdrop="true"/><allow own="*"/>{deny}</policy>"""
CONF = """<busconfig><type>{type}</type><servicedir>{watched}</servicedir><servicedir>{late}</servicedir>
  {policy}{limits}</busconfig>"""
MODES = ["self", "launcher"]


class ReloadBus:
    """A bus whose config (in a directory of its own) names two service dirs: ``watched`` exists from the
    start (inotify sees it), ``late`` does not (nothing watches it until a reload finds it)."""

    def __init__(self, mode: str):
        if mode == "launcher" and os.geteuid() != 0:
            pytest.skip("the privilege-separated system bus needs root")
        self.mode = mode
        self.system = mode == "launcher"
        self.root = Path(tempfile.mkdtemp(prefix="sealbus-reload-"))
        self.root.chmod(0o755)
        for sub in ("conf", "watched", "sock"):
            (self.root / sub).mkdir(mode=0o755)
        self.conf = self.root / "conf" / "bus.conf"
        self.watched, self.late = self.root / "watched", self.root / "late"
        self.write_conf()
        self.log_path = self.root / "bus.log"
        log = open(self.log_path, "w")
        args = [SEALBUS, "run", "--config", str(self.conf), "--log-level", "info"]
        if self.system:
            args += ["--system", "--runtime-dir", str(self.root / "sock")]
        else:
            args += ["--address", f"unix:path={self.root / 'sock' / 'bus'}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True)
        self.address = self.proc.stdout.readline().strip()
        assert self.address.startswith("unix:path="), self.logtext()

    def write_conf(self, deny: str = "", text: str | None = None, limits: str = "") -> None:
        if text is None:
            text = CONF.format(type="system" if self.system else "session", watched=self.watched, late=self.late,
                               policy=POLICY.format(deny=deny), limits=limits)  # fmt: skip
        tmp = self.conf.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.rename(self.conf)  # whole, as a package manager writes it: never half a file

    def service(self, where: Path, name: str) -> Path:
        where.mkdir(mode=0o755, exist_ok=True)
        path = where / f"{name}.service"
        user = "User=root\n" if self.system else ""
        path.write_text(f"[D-BUS Service]\nName={name}\nExec=/bin/false\n{user}")
        return path

    def logtext(self) -> str:
        return self.log_path.read_text()

    def driver(self, member: str, user=None) -> subprocess.CompletedProcess:
        argv = ["dbus-send", f"--bus={self.address}", "--print-reply", "--dest=org.freedesktop.DBus",
                "/org/freedesktop/DBus", f"org.freedesktop.DBus.{member}"]  # fmt: skip
        if user is not None:
            return run_as(user, argv)
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)

    def activatable(self) -> list[str]:
        out = self.driver("ListActivatableNames")
        assert out.returncode == 0, out.stderr
        return [line.split('"')[1] for line in out.stdout.splitlines() if line.strip().startswith("string")]

    def stop(self) -> None:
        terminate(self.proc, timeout=15)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(params=MODES)
def rbus(request):
    bus = ReloadBus(request.param)
    yield bus
    bus.stop()


def owner_of(bus: ReloadBus, name: str) -> str:
    with open_dbus_connection(bus.address) as c:
        return c.send_and_get_reply(message_bus.GetNameOwner(name), timeout=10).body[0]


def still_up(conn) -> bool:
    ping = new_method_call(DBusAddress("/", bus_name="org.freedesktop.DBus", interface="org.freedesktop.DBus.Peer"),
                           "Ping")  # fmt: skip
    return conn.send_and_get_reply(ping, timeout=10).header.message_type.name == "method_return"


@needs_dbus_send
def test_reload_config_sees_new_and_removed_service_files(rbus):
    """A service file in a directory nothing watches shows up after ReloadConfig, and is gone after the next
    once removed; the connection that owned a name before still owns it, and still works."""
    keeper = open_dbus_connection(rbus.address)
    assert keeper.send_and_get_reply(message_bus.RequestName("org.example.Kept")).body[0] == 1
    assert rbus.activatable() == ["org.freedesktop.DBus"]
    svc = rbus.service(rbus.late, "org.example.Late")
    assert "org.example.Late" not in rbus.activatable()  # nothing has reloaded yet
    out = rbus.driver("ReloadConfig")
    assert out.returncode == 0, out.stderr
    assert rbus.activatable() == ["org.freedesktop.DBus", "org.example.Late"]
    svc.unlink()
    assert rbus.driver("ReloadConfig").returncode == 0
    assert rbus.activatable() == ["org.freedesktop.DBus"]
    assert still_up(keeper) and owner_of(rbus, "org.example.Kept") == keeper.unique_name
    keeper.close()


@needs_dbus_send
def test_sighup_rereads_service_files(rbus):
    keeper = open_dbus_connection(rbus.address)
    assert keeper.send_and_get_reply(message_bus.RequestName("org.example.Kept")).body[0] == 1
    rbus.service(rbus.late, "org.example.Late")
    rbus.proc.send_signal(signal.SIGHUP)  # the launcher's pid on the system bus, the bus's own otherwise
    assert wait_until(lambda: "org.example.Late" in rbus.activatable()), rbus.logtext()
    assert rbus.proc.poll() is None
    assert still_up(keeper) and owner_of(rbus, "org.example.Kept") == keeper.unique_name
    keeper.close()


@needs_dbus_send
def test_inotify_sees_added_and_removed_service_files(rbus):
    svc = rbus.service(rbus.watched, "org.example.Watched")
    assert wait_until(lambda: "org.example.Watched" in rbus.activatable()), rbus.logtext()
    if shutil.which("busctl"):
        out = subprocess.run(["busctl", f"--address={rbus.address}", "list", "--no-pager"], capture_output=True,
                             text=True, timeout=30)  # fmt: skip
        assert out.returncode == 0, out.stderr
        line = next(x for x in out.stdout.splitlines() if x.startswith("org.example.Watched "))
        assert "(activatable)" in line
    svc.unlink()
    assert wait_until(lambda: "org.example.Watched" not in rbus.activatable()), rbus.logtext()


def test_reload_applies_a_changed_deny_rule(rbus):
    c = open_dbus_connection(rbus.address)
    assert c.send_and_get_reply(message_bus.RequestName("org.example.Before")).body[0] == 1
    rbus.write_conf(deny='<deny own="org.example.Forbidden"/>')
    reply = c.send_and_get_reply(new_method_call(message_bus, "ReloadConfig"), timeout=30)
    assert reply.header.message_type.name == "method_return", reply.body
    reply = c.send_and_get_reply(message_bus.RequestName("org.example.Forbidden"))
    assert reply.header.message_type.name == "error" and "AccessDenied" in str(reply.header.fields)
    assert c.send_and_get_reply(message_bus.GetNameOwner("org.example.Before")).body[0] == c.unique_name
    c.close()


def test_reload_applies_changed_limits(rbus):
    """As dbus-daemon, <limit> values are re-read too: a lower max_names_per_connection (the unique name
    counts) refuses the next name; what a connection already owns stays owned."""
    c = open_dbus_connection(rbus.address)
    for name in ("org.example.N1", "org.example.N2", "org.example.N3"):
        assert c.send_and_get_reply(message_bus.RequestName(name)).body[0] == 1
    rbus.write_conf(limits='<limit name="max_names_per_connection">3</limit>')
    reply = c.send_and_get_reply(new_method_call(message_bus, "ReloadConfig"), timeout=30)
    assert reply.header.message_type.name == "method_return", reply.body
    reply = c.send_and_get_reply(message_bus.RequestName("org.example.N4"))
    assert reply.header.message_type.name == "error" and "LimitsExceeded" in str(reply.header.fields)
    assert c.send_and_get_reply(message_bus.GetNameOwner("org.example.N3")).body[0] == c.unique_name
    with open_dbus_connection(rbus.address) as fresh:  # a new connection: two names, then the limit
        assert fresh.send_and_get_reply(message_bus.RequestName("org.example.F1")).body[0] == 1
        assert fresh.send_and_get_reply(message_bus.RequestName("org.example.F2")).body[0] == 1
        reply = fresh.send_and_get_reply(message_bus.RequestName("org.example.F3"))
        assert reply.header.message_type.name == "error" and "LimitsExceeded" in str(reply.header.fields)
    c.close()


@needs_dbus_send
def test_broken_config_on_reload_keeps_the_old_one(rbus):
    """As dbus-daemon: the caller gets org.freedesktop.DBus.Error.Failed with the reason; the old policy and
    the old catalogue stay in force."""
    rbus.service(rbus.late, "org.example.Late")
    rbus.write_conf(deny='<deny own="org.example.Forbidden"/>')
    assert rbus.driver("ReloadConfig").returncode == 0
    rbus.write_conf(text="<busconfig><unknown-element/></busconfig>")
    (rbus.late / "org.example.Late.service").unlink()
    out = rbus.driver("ReloadConfig")
    assert out.returncode != 0 and "org.freedesktop.DBus.Error.Failed" in out.stderr, (out.stdout, out.stderr)
    assert "unknown element <unknown-element>" in out.stderr
    assert rbus.activatable() == ["org.freedesktop.DBus", "org.example.Late"]  # the old catalogue
    with open_dbus_connection(rbus.address) as c:
        reply = c.send_and_get_reply(message_bus.RequestName("org.example.Forbidden"))
        assert reply.header.message_type.name == "error" and "AccessDenied" in str(reply.header.fields)


@needs_dbus_send
def test_an_unprivileged_caller_may_reload_as_with_dbus_daemon(test_users):
    """dbus-daemon lets any caller its policy allows ask for ReloadConfig (its system.conf allows the whole
    org.freedesktop.DBus interface); so does sealbus: a reload costs the bus one bounded re-read."""
    bus = ReloadBus("launcher")
    try:
        bus.service(bus.late, "org.example.Late")
        out = bus.driver("ReloadConfig", user=test_users[1])
        assert out.returncode == 0, out.stderr
        assert "org.example.Late" in bus.activatable()
    finally:
        bus.stop()


def test_reload_calls_are_coalesced(tmp_path):
    """Hundreds of ReloadConfig calls in a burst are all answered, by far fewer reloads than calls."""
    bus = ReloadBus("self")
    try:
        calls = 300
        with open_dbus_connection(bus.address) as c:
            for _ in range(calls):
                c.send(new_method_call(message_bus, "ReloadConfig"))
            kinds = []
            while len(kinds) < calls:
                kind = c.receive(timeout=30).header.message_type.name
                if kind != "signal":  # NameAcquired
                    kinds.append(kind)
        assert kinds == ["method_return"] * calls
        reloads = bus.logtext().count("configuration reloaded")
        assert 1 <= reloads < calls, reloads
    finally:
        bus.stop()


# -- the core side, without sockets ---------------------------------------------------------------------------


def test_list_activatable_names_is_the_catalogue_and_the_driver(core):
    c = CoreClient(core)
    c.call("ListActivatableNames")
    assert summarize(c.take()) == [("return", None, (["org.freedesktop.DBus"],))]
    svc = ServiceFile("org.example.A", "/bin/false", None, None, "/d/org.example.A.service")
    core.catalog = ServiceCatalog({svc.name: svc})
    c.call("ListActivatableNames")
    assert summarize(c.take()) == [("return", None, (["org.freedesktop.DBus", "org.example.A"],))]


def test_waiting_reload_callers_are_bounded(core):
    """Past MAX_WAITERS callers waiting for one reload, the next is refused at once (LimitsExceeded)."""
    reloader = Reloader(core, None, "session")
    core.reload_hook = reloader.driver_hook
    c = CoreClient(core)
    for _ in range(MAX_WAITERS):
        c.call("ReloadConfig")
    assert c.take() == []  # all waiting: answered when the reload is done
    c.call("ReloadConfig")
    assert [(h.type, h.error_name) for h, _ in c.take()] == [(3, "org.freedesktop.DBus.Error.LimitsExceeded")]
    assert len(reloader.waiters) == MAX_WAITERS


def test_watch_paths_are_config_dirs_includedirs_and_watched_servicedirs(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    conf = tmp_path / "bus.conf"
    conf.write_text(f"<busconfig><includedir>{tmp_path / 'd'}</includedir><servicedir>/s</servicedir>"
                    "<standard_session_servicedirs/></busconfig>")  # fmt: skip
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/4242")
    loaded = reload_mod.read_config(str(conf), "session")
    assert loaded.watch[:3] == [str(tmp_path), str(tmp_path / "d"), "/s"]
    assert loaded.watch[3:] and all(p.endswith("dbus-1/services") for p in loaded.watch[3:])
    assert "/run/user/4242/dbus-1/services" not in loaded.watch  # the transient dir: not watched, as dbus-daemon


def test_inotify_flood_costs_few_reloads_and_the_bus_keeps_serving():
    """Thousands of files written into a watched service directory: the bus keeps answering while they land,
    the changes are coalesced into a few reloads, and the catalogue ends up with every valid file."""
    bus = ReloadBus("self")
    try:
        files = 2000
        with open_dbus_connection(bus.address) as c:
            for i in range(files):
                bus.service(bus.watched, f"org.example.Flood{i}")
                if i % 500 == 0:
                    assert still_up(c)
        assert wait_until(lambda: len(bus.activatable()) == files + 1, timeout=30), bus.logtext()[-2000:]
        reloads = bus.logtext().count("configuration reloaded")
        assert 1 <= reloads < files // 10, reloads
    finally:
        bus.stop()


def _wait_exec_done(proc, argv0: bytes) -> None:
    """Until ``proc`` runs ``argv0``: inside execve its /proc cmdline reads empty for a moment, which
    ``broker_exiting`` rightly takes for a broker on its way out (the real broker is long past exec when
    the launcher supervises it: wait_ready comes first)."""
    deadline = time.monotonic() + 10
    while not Path(f"/proc/{proc.pid}/cmdline").read_bytes().startswith(argv0):
        assert time.monotonic() < deadline, "the child never ran " + argv0.decode()
        time.sleep(0.01)


def test_launcher_serves_reload_requests_by_id_and_reads_only_its_own_config(tmp_path):
    """The launcher's side of the control channel, with a real child as the "broker": a burst of requests
    (carrying junk fields such as a path) is served by one reload answering the last id, and what it sends
    back comes from its own config file only."""
    import socket
    import threading

    from broker.io import control
    from broker.launch.launcher import supervise

    svc_dir = tmp_path / "svc"
    svc_dir.mkdir()
    (svc_dir / "org.example.Mine.service").write_text("[D-BUS Service]\nName=org.example.Mine\nExec=/bin/false\n"
                                                      "User=root\n")  # fmt: skip
    conf = tmp_path / "bus.conf"
    conf.write_text(f"<busconfig><type>system</type><servicedir>{svc_dir}</servicedir></busconfig>")
    ours, theirs = socket.socketpair()
    child = subprocess.Popen(["sleep", "60"])
    _wait_exec_done(child, b"sleep")  # as in the launcher, where supervise() starts once the broker is up
    stop = {"sig": None}
    t = threading.Thread(target=supervise, args=(child, ours, str(conf), None, stop), daemon=True)
    t.start()
    try:
        burst = b"".join(control.encode({"type": "reload-request", "id": i, "path": "/etc/shadow"})
                         for i in range(1, 101))  # fmt: skip
        theirs.sendall(burst)
        theirs.settimeout(30)
        first = control.recv_msg(theirs)
        assert first["type"] == "reload" and first["ok"] is True
        assert [s[0] for s in first["catalog"]["services"]] == ["org.example.Mine"]
        answered = {first["id"]}
        theirs.settimeout(1.0)
        try:
            while True:
                answered.add(control.recv_msg(theirs)["id"])
        except TimeoutError:
            pass
        assert 100 in answered and len(answered) < 100, answered
    finally:
        stop["sig"] = signal.SIGTERM
        t.join(timeout=20)
        terminate(child, timeout=5)
        ours.close()
        theirs.close()
    assert not t.is_alive()


def test_a_reload_to_a_config_requiring_apparmor_fails_and_the_old_config_stays(tmp_path):
    """As at start-up (tests/test_settings_paths.py): sealbus cannot honour <apparmor mode="required"/>."""
    conf = tmp_path / "bus.conf"
    conf.write_text('<busconfig><apparmor mode="required"/></busconfig>')
    with pytest.raises(reload_mod.ReloadFailed, match="AppArmor"):
        reload_mod.read_config(str(conf), "session")
