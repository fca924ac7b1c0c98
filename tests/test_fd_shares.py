"""Fds nobody claims, unauthenticated sockets and fair fd shares: what one client or
one uid can make the broker hold, measured on a real broker's /proc/PID/fd."""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from broker.wire.message import build_message

from .conftest import SEALBUS, Bus, assert_fds_back_and_alive, bus_is_alive, connected, popen_as, run_as, wait_until

ALLOW_ALL = """<busconfig><type>{type}</type><policy context="default"><allow user="*"/>
  <allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/><allow own="*"/></policy>
  {limits}</busconfig>"""


def start_bus(tmp_path, conf: str, nofile: int | None = None, name="bus") -> Bus:
    """`sealbus run --config` on a socket every uid reaches, optionally under a small RLIMIT_NOFILE."""
    sockdir = tempfile.mkdtemp(prefix="sealbus-test-")
    os.chmod(sockdir, 0o755)
    path = Path(sockdir) / name
    cfg = tmp_path / f"{name}.conf"
    cfg.write_text(conf)
    log = open(tmp_path / f"{name}.log", "w")
    prefix = ["prlimit", f"--nofile={nofile}:{nofile}"] if nofile else []
    proc = subprocess.Popen([*prefix, SEALBUS, "run", "--address", f"unix:path={path}", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=log, text=True)  # fmt: skip
    address = proc.stdout.readline().strip()
    assert address, (tmp_path / f"{name}.log").read_text()
    return Bus(proc, address, path, tmp_path / f"{name}.log")


@pytest.fixture
def buses():
    made = []
    yield made
    for b in made:
        b.stop()


# -- (2) fds no message claims ---------------------------------------------------------------


def test_framer_holds_no_fd_that_no_message_claims():
    from broker.wire.errors import WireError
    from broker.wire.framer import Framer

    with_fd = build_message(1, 1, path="/", member="M", signature="h", body=(0,), unix_fds=1)
    plain = build_message(1, 2, path="/", member="M")
    many = build_message(1, 3, path="/", member="M", signature="h", body=(0,), unix_fds=40)
    f = Framer()
    assert [m.fds for m in f.feed(with_fd, fds=[7])] == [[7]]
    f.check_fds()  # claimed: fine
    f.feed(with_fd[:20], fds=[8])
    f.check_fds()  # a message in progress may claim it
    cases = [
        (plain, [5]),  # a complete message without UNIX_FDS
        (with_fd, [5, 6]),  # more than its UNIX_FDS
        (with_fd[:8], list(range(17))),  # header not in yet: more than max_message_unix_fds
        (plain[:-1], [5]),  # header in, UNIX_FDS absent: nothing to claim
        (with_fd[:-1], [5, 6]),  # header in: more than its UNIX_FDS
        (many[:-1], list(range(17))),  # header in: UNIX_FDS above max_message_unix_fds
    ]
    for data, fds in cases:
        f = Framer()
        f.feed(data, fds=fds)
        with pytest.raises(WireError):
            f.check_fds()


def test_unclaimed_fds_disconnect_and_leave_nothing_behind(sealbus):
    base = sealbus.fd_count()
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(200)]
    try:
        no_unix_fds = build_message(1, 2, path="/", member="M", destination="org.x.Y")
        declares_one = build_message(1, 2, path="/", member="M", destination="org.x.Y", signature="h", body=(0,),
                                     unix_fds=1)  # fmt: skip
        sends = [no_unix_fds, declares_one]  # each sent with 200 fds
        for msg in sends:
            c = connected(sealbus)
            for _ in range(10):  # what used to pile up: 2000 fds held by nobody
                try:
                    c.send_raw(msg, fds)
                except OSError:
                    break
            assert c.closed_by_peer(timeout=5), "a client sending fds no message claims stays connected"
            c.close()
        log = sealbus.log_path.read_text()
        assert "no message claims" in log and "uid=" in log and "pid=" in log and "label=" in log
    finally:
        for fd in fds:
            os.close(fd)
    assert_fds_back_and_alive(sealbus, base)


def test_pending_fd_timeout_disconnects_a_client_holding_half_a_message(tmp_path, buses):
    bus = start_bus(tmp_path, ALLOW_ALL.format(type="session",
                                               limits='<limit name="pending_fd_timeout">500</limit>'))  # fmt: skip
    buses.append(bus)
    base = bus.fd_count()
    other = connected(bus)
    c = connected(bus)
    msg = build_message(1, c.next_serial(), path="/", member="M", destination=other.unique_name, signature="h",
                        body=(0,), unix_fds=1)  # fmt: skip
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        c.send_raw(msg[: len(msg) // 2], [fd])
    finally:
        os.close(fd)
    assert wait_until(lambda: bus.fd_count() == base + 3)  # two sockets and the held fd
    t = time.monotonic()
    assert c.closed_by_peer(timeout=5), "half a message with an fd is held forever"
    assert time.monotonic() - t < 3
    assert "pending_fd_timeout" in bus.log_path.read_text()
    assert wait_until(lambda: bus.fd_count() == base + 1), (bus.fd_count(), base)
    # an ordinary client sending a message with fds in pieces is not affected
    c = connected(bus)
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        c.send_raw(msg[:20], [fd])
        time.sleep(0.2)
        c.send_raw(msg[20:])
    finally:
        os.close(fd)
    other.sock.settimeout(5)
    got = other.recv()
    assert got.header.fields
    time.sleep(0.6)
    assert bus_is_alive(bus)
    c.sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        c.sock.recv(1)  # still connected: nothing to read, no EOF


# -- (7) unauthenticated sockets -------------------------------------------------------------

SILENT = """
import socket, sys
socks = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    socks.append(s)
print("ready", flush=True)
sys.stdin.read()
"""

CONNECT_10 = """
import sys
from jeepney.io.blocking import open_dbus_connection
ok = 0
for _ in range(10):
    try:
        c = open_dbus_connection(sys.argv[1], auth_timeout=5)
        c.close()
        ok += 1
    except Exception:
        pass
print(ok)
"""


def _silent_sockets_do_not_lock_out(socket_path, address, logtext, users) -> None:
    hog, other = users
    silent = popen_as(hog, [sys.executable, "-c", SILENT, str(socket_path), "80"], stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert silent.stdout.readline().strip() == "ready"
        # the broker has seen all 80 once it turned 16 of them away (old) or dropped 64 (now)
        assert wait_until(lambda: logtext().count("incomplete connections") >= 16), logtext()[-2000:]
        out = run_as(other, [sys.executable, "-c", CONNECT_10, address], timeout=120)
        assert out.stdout.strip() == "10", (out.stdout, out.stderr[-2000:], logtext()[-2000:])
        assert "dropped unauthenticated connection" in logtext()
    finally:
        silent.stdin.close()
        silent.wait(timeout=10)


def test_silent_sockets_of_one_uid_do_not_lock_out_another(tmp_path, buses, test_users):
    bus = start_bus(tmp_path, ALLOW_ALL.format(type="session",
                                               limits='<limit name="max_incomplete_connections">64</limit>'))  # fmt: skip
    buses.append(bus)
    _silent_sockets_do_not_lock_out(bus.path, bus.address, bus.log_path.read_text, test_users)
    assert bus_is_alive(bus)


@pytest.mark.skipif(os.geteuid() != 0, reason="the privilege-separated system bus needs root")
def test_silent_sockets_do_not_lock_out_another_uid_on_the_system_bus(test_users):
    from .test_privsep import SystemBus

    bus = SystemBus()
    try:
        _silent_sockets_do_not_lock_out(bus.socket, bus.address, bus.logtext, test_users)
    finally:
        bus.stop()


def test_at_the_global_limit_the_uid_holding_most_loses_its_oldest(tmp_path, buses):
    if os.geteuid() != 0:
        pytest.skip("needs root to run clients as other uids")
    import pwd

    bus = start_bus(tmp_path, ALLOW_ALL.format(type="session",
                                               limits='<limit name="max_incomplete_connections">8</limit>'))  # fmt: skip
    buses.append(bus)
    silent = []
    try:
        for uid, n in [(61101, 3), (61102, 2), (61103, 2), (61104, 2)]:  # 2 each stay: the share is 8 / 4
            user = pwd.struct_passwd(("x", "x", uid, uid, "", "/", "/bin/sh"))
            p = popen_as(user, [sys.executable, "-c", SILENT, str(bus.path), str(n)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
            silent.append(p)
            assert p.stdout.readline().strip() == "ready"
        assert wait_until(lambda: "incomplete connections" in bus.log_path.read_text())  # E connects behind them
        user = pwd.struct_passwd(("x", "x", 61105, 61105, "", "/", "/bin/sh"))
        out = run_as(user, [sys.executable, "-c", CONNECT_10, bus.address], timeout=120)
        assert out.stdout.strip() == "10", (out.stdout, out.stderr[-2000:], bus.log_path.read_text()[-2000:])
        assert "(max_incomplete_connections)" in bus.log_path.read_text()
    finally:
        for p in silent:
            p.stdin.close()
            p.wait(timeout=10)
    assert bus_is_alive(bus)


def test_system_buses_get_a_short_auth_timeout(tmp_path):
    from broker.access.config import load_config
    from broker.access.config_settings import settings_from_config
    from broker.bus.limits import SYSTEM_AUTH_TIMEOUT, Limits
    from broker.launch.launcher import broker_settings

    assert SYSTEM_AUTH_TIMEOUT < Limits().auth_timeout
    for typ, limits, want in [("system", "", SYSTEM_AUTH_TIMEOUT), ("session", "", Limits().auth_timeout),
                              ("system", '<limit name="auth_timeout">20000</limit>', 20000)]:  # fmt: skip
        p = tmp_path / f"{typ}{len(limits)}.conf"
        p.write_text(ALLOW_ALL.format(type=typ, limits=limits))
        cfg = load_config(str(p))
        assert settings_from_config(cfg).limits.auth_timeout == want
        import pwd

        assert broker_settings(cfg, pwd.getpwuid(0))["limits"]["auth_timeout"] == want  # sealbus run --system


# -- (10) fair fd shares ---------------------------------------------------------------------


def test_fd_shares_never_exhaust_the_pool():
    from broker.bus.peer import FdQuota, UserAccount

    for pool in (64, 896, 17500):
        q = FdQuota(pool)
        users = [UserAccount(uid, quota=q) for uid in range(50)]
        for _ in range(3):  # everyone greedy, in turns, 16 fds at a time
            for u in users:
                while not q.refuses(u, 16):
                    u.charge_fds(16)
        assert q.used == sum(u.message_fds for u in users) and q.users == sum(1 for u in users if u.message_fds)
        assert q.used < pool
        newcomer = UserAccount(99, quota=q)
        assert q.share(newcomer) >= 1
        for u in users:
            u.charge_fds(-u.message_fds)
        assert q.used == 0 and q.users == 0


PIN = """
import os, socket, sys
from jeepney.io.blocking import open_dbus_connection
from jeepney import DBusAddress, new_method_call, message_bus
receivers = []
for _ in range(3):  # never read: every fd sent to them stays in the broker
    c = open_dbus_connection(sys.argv[1], enable_fds=True)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    receivers.append(c)
sender = open_dbus_connection(sys.argv[1], enable_fds=True)
fd = os.open("/dev/null", os.O_RDONLY)
from jeepney.low_level import MessageFlag
try:
    for r in receivers:  # fill their sockets: what follows stays queued in the broker
        for _ in range(4):
            msg = new_method_call(DBusAddress("/", bus_name=r.unique_name, interface="org.x.I"), "Fill", "s",
                                  ("x" * 100000,))
            msg.header.flags |= MessageFlag.no_reply_expected
            sender.send(msg)
    for i in range(60):
        for r in receivers:
            msg = new_method_call(DBusAddress("/", bus_name=r.unique_name, interface="org.x.I"), "Pin",
                                  "h" * 16, tuple([fd] * 16))
            msg.header.flags |= MessageFlag.no_reply_expected
            sender.send(msg)
    sender.send_and_get_reply(message_bus.GetId(), timeout=20)  # everything before it was routed
    print("pinned", flush=True)
except Exception as e:
    print("failed", type(e).__name__, e, flush=True)
sys.stdin.read()
"""

PASS_FD = """
import os, sys
from jeepney import DBusAddress, new_method_call
from jeepney.io.blocking import open_dbus_connection
from jeepney.low_level import HeaderFields
c = open_dbus_connection(sys.argv[1], enable_fds=True, auth_timeout=5)
r, w = os.pipe()
c.send(new_method_call(DBusAddress("/", bus_name=c.unique_name, interface="org.x.I"), "Take", "h", (r,)))
m = c.receive(timeout=5)
while m.header.fields.get(HeaderFields.member) != "Take":
    m = c.receive(timeout=5)
got = m.body[0].to_raw_fd()
print(os.fstat(got).st_ino == os.fstat(r).st_ino)
"""


def test_many_uids_pinning_fds_leave_room_for_a_newcomer(tmp_path, buses):
    if os.geteuid() != 0:
        pytest.skip("needs root to run clients as other uids")
    import pwd

    # receivers take up to 256 fds each (the clamp to RLIMIT_NOFILE / 4): the fd share is what binds
    bus = start_bus(tmp_path, ALLOW_ALL.format(type="session", limits='<limit name="max_outgoing_unix_fds">4096</limit>'),
                    nofile=1024)  # fmt: skip
    buses.append(bus)

    def as_uid(uid):
        return pwd.struct_passwd(("x", "x", uid, uid, "", "/", "/bin/sh"))

    pinners, said = [], []
    try:
        for uid in range(61001, 61007):  # six uids (no passwd entries needed: the kernel reports the uid)
            p = popen_as(as_uid(uid), [sys.executable, "-c", PIN, bus.address], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
            pinners.append(p)
            said.append(p.stdout.readline().strip())
        held = bus.fd_count()
        assert held < 1024 - 64, f"the broker holds {held} of its 1024 fds"
        assert "fd share" in bus.log_path.read_text(), said
        out = run_as(as_uid(61010), [sys.executable, "-c", PASS_FD, bus.address], timeout=60)
        assert out.stdout.strip() == "True", (out.stdout, out.stderr[-1500:], bus.log_path.read_text()[-1500:])
    finally:
        for p in pinners:
            p.stdin.close()
            p.wait(timeout=20)
    assert wait_until(lambda: bus.fd_count() < 40), bus.fd_count()
    assert bus_is_alive(bus)


def test_fds_count_once_and_a_sender_over_its_share_pays_itself(core):
    from broker.wire.message import HeaderView

    from .conftest import CoreClient

    core.fd_quota.pool = 64  # alone, a user may hold 32
    sender = CoreClient(core, uid=1001)
    subs = [CoreClient(core, uid=1002) for _ in range(3)]
    for s in subs:
        s.call("AddMatch", "s", ("type='signal',interface='org.x.F'",))
        s.take()

    def send(member, **fields):
        sender.serial += 1
        raw = build_message(4 if member == "F" else 1, sender.serial, path="/", interface="org.x.F", member=member,
                            signature="h" * 16, body=tuple(range(16)), unix_fds=16, **fields)  # fmt: skip
        core.dispatch(
            sender.peer, (HeaderView(memoryview(raw)), [os.open("/dev/null", os.O_RDONLY) for _ in range(16)])
        )

    send("F")
    assert sender.peer.account.message_fds == 16  # one broadcast to three subscribers holds 16 fds, not 48
    send("F")
    send("F")  # over the share: dropped, and no subscriber pays for it
    assert [len(s.take()) for s in subs] == [2, 2, 2]
    assert not any(s.peer.dying for s in subs)
    assert sender.peer.account.message_fds == 0 and core.fd_quota.used == 0  # written: closed and returned
    for _ in range(2):
        send("F")
    send("Call", destination=subs[0].name)
    errors = [h.error_name for h, _ in sender.take() if h.type == 3]
    assert errors == ["org.freedesktop.DBus.Error.LimitsExceeded"]
    assert not any(s.peer.dying for s in subs)


@pytest.mark.timeout(120)
def test_fds_waiting_for_a_close_count_against_the_senders_share(tmp_path, buses, test_users):
    """Fds whose close blocks (a never-FLUSH FUSE file) stay in the broker until a worker closes them.
    They used to be bounded only by max_inflight_fds_per_user (here 4096), not by the fd pool: one uid
    filled the broker's 1024 fds and nobody could pass an fd or connect. Now they count against the
    sender's fd share: it is disconnected at its share and the broker keeps room for everyone else."""
    from .test_fd_close import hostile, reap, sender

    if os.geteuid() != 0:
        pytest.skip("needs root to mount FUSE and run clients as other uids")
    bus = start_bus(tmp_path, ALLOW_ALL.format(type="session", limits='<limit name="max_inflight_fds_per_user">4096'
                                               '</limit><limit name="max_outgoing_unix_fds">4096</limit>'),
                    nofile=1024)  # fmt: skip
    buses.append(bus)
    attacker, other = test_users
    from contextlib import ExitStack

    with ExitStack() as st:
        mnt = st.enter_context(hostile())
        proc, lines = st.enter_context(sender(attacker, bus, mnt / "f", 16, msgs=80))  # 1280 stuck fds
        held = bus.fd_count()
        assert held < 1024 - 64, f"the broker holds {held} of its 1024 fds"
        assert any(line.startswith("reply-failed") for line in lines), lines  # disconnected on the way
        log = bus.log_path.read_text()
        assert f"uid {attacker.pw_uid} has" in log and "(fd share)" in log, log[-2000:]
        out = run_as(other, [sys.executable, "-c", PASS_FD, bus.address], timeout=60)
        assert out.stdout.strip() == "True", (out.stdout, out.stderr[-1500:], bus.log_path.read_text()[-1500:])
    reap(proc)
    assert wait_until(lambda: bus.fd_count() < 40), bus.fd_count()
    assert bus_is_alive(bus)
