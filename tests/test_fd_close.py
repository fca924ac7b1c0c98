"""Closing the fds clients pass, on a live bus with a hostile FUSE mount (class 3 of the hardening issue),
the core's declared close actions, and the classifier inside the broker's sandbox.

A FUSE server that never answers FLUSH makes close() of its file wait forever.
The broker must never do that close on its loop thread (not even when it cannot
stat the file), one such mount may pin at most one closer thread, and a uid
whose fds wait to be closed beyond its share is disconnected and refused.
"""

import os
import signal
import subprocess
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from .conftest import RawClient, popen_as, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts FUSE and runs clients as other users")

# A client of another uid: passes ``n`` fds of PATH per message to a name nobody owns (the bus answers
# ServiceUnknown, then closes its copies), ``msgs`` times; prints one line per reply and "sent"; then,
# on a line from stdin, checks whether its connection still works and whether a new one is accepted.
# Its own copies stay open: closing them would hang it too (the server never answers FLUSH).
SENDER = r"""
import os, sys
from jeepney import DBusAddress, new_method_call, message_bus
from jeepney.io.blocking import open_dbus_connection
addr, path, n, msgs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
c = open_dbus_connection(addr, enable_fds=True)
fds = [os.open(path, os.O_RDONLY) for _ in range(n)]
nobody = DBusAddress("/", bus_name="org.sealbus.Test.Nobody", interface="org.sealbus.Test")
for _ in range(msgs):
    try:
        r = c.send_and_get_reply(new_method_call(nobody, "Take", "h" * n, tuple(fds)), timeout=10)
        print("reply", r.header.fields.get(4), flush=True)
    except Exception as e:
        print("reply-failed", type(e).__name__, flush=True)
print("sent", flush=True)
sys.stdin.readline()
try:
    c.send_and_get_reply(message_bus.GetId(), timeout=5)
    print("still-connected", flush=True)
except Exception as e:
    print("disconnected", type(e).__name__, flush=True)
try:
    c2 = open_dbus_connection(addr)
    c2.send_and_get_reply(message_bus.GetId(), timeout=5)
    print("reconnected", flush=True)
except Exception as e:
    print("refused", type(e).__name__, flush=True)
sys.stdin.readline()
"""


def reachable_dir(prefix: str) -> Path:
    """A fresh directory other users can reach (pytest's tmp_path is 0700 root)."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(d, 0o755)
    return d


@contextmanager
def hostile(user=None):
    """The never-FLUSH FUSE fs: mounted by root with allow_other, or by ``user`` without it."""
    from tests import hostile_fuse as hf

    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    d = reachable_dir("sealbus-hostile-")
    mnt = d / "mnt"
    mnt.mkdir()
    try:
        with hf.mount(mnt, user=user) as m:
            yield m
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)
        for p in (mnt, d):
            try:
                p.rmdir()
            except OSError:
                pass


@contextmanager
def sender(user, bus, path, n, msgs=1):
    """Run SENDER as ``user``; yields (proc, lines read so far up to "sent")."""
    proc = popen_as(user, [sys.executable, "-c", SENDER, bus.address, str(path), str(n), str(msgs)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")  # fmt: skip
    try:
        lines = []
        while True:
            line = proc.stdout.readline().strip()
            assert line, f"sender ended early: {lines}"
            lines.append(line)
            if line == "sent":
                break
        yield proc, lines
    finally:
        # the caller's `hostile` mount is killed after this: its stuck closes (ours too) return then
        proc.kill()


def reap(proc):
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def bus_serves_new_clients(bus, n: int = 3) -> None:
    """Fresh clients authenticate and get their Hello answered (each within 5 s)."""
    for _ in range(n):
        c = RawClient(bus, timeout=5)
        assert c.authenticate().startswith(b"OK")
        c.hello()
        c.sock.close()


def fd_links(pid: int) -> list[str]:
    out = []
    for n in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{n}"))
        except OSError:
            pass
    return sorted(out)


# -- (a) a user's own FUSE mount (no allow_other: the broker cannot even stat it) -----------------


@pytest.mark.timeout(60)
def test_private_fuse_fd_does_not_freeze_the_loop(sealbus, test_users):
    """The broker gets EACCES from statx on a user's fusermount3 mount; it used to conclude "cannot
    block" and close the fd on its loop thread, hanging in FLUSH: nobody could authenticate."""
    user = test_users[0]
    with ExitStack() as st:
        mnt = st.enter_context(hostile(user))
        proc, lines = st.enter_context(sender(user, sealbus, mnt / "f", 1))
        assert lines[0].startswith("reply"), lines
        bus_serves_new_clients(sealbus)
    reap(proc)


# -- (b) 8+ stuck fds of one mount must not starve every other user's closes ------------------------


@pytest.mark.timeout(90)
def test_stuck_mount_does_not_keep_other_users_fds_open(sealbus, test_users):
    """10 fds of a never-FLUSH file (allow_other, another uid) used to pin all 8 closer threads; after
    that every regular file anyone passed stayed open in the broker. Now the broker's fd count returns
    to its baseline once the other user's messages are answered."""
    from jeepney import DBusAddress, message_bus, new_method_call
    from jeepney.io.blocking import open_dbus_connection

    with ExitStack() as st:
        mnt = st.enter_context(hostile())
        victim = open_dbus_connection(sealbus.address, enable_fds=True)
        st.callback(victim.close)
        proc, lines = st.enter_context(sender(test_users[0], sealbus, mnt / "f", 10))
        assert lines[0] == "reply org.freedesktop.DBus.Error.ServiceUnknown", lines
        victim.send_and_get_reply(message_bus.GetId(), timeout=10)  # the pass that took them is over
        baseline = sealbus.fd_count()  # the 10 stuck fds included
        nobody = DBusAddress("/", bus_name="org.sealbus.Test.Nobody", interface="org.sealbus.Test")
        for _ in range(4):
            files = [os.open(__file__, os.O_RDONLY) for _ in range(5)]
            try:
                victim.send_and_get_reply(new_method_call(nobody, "Take", "hhhhh", tuple(files)), timeout=10)
            finally:
                for fd in files:
                    os.close(fd)
        assert wait_until(lambda: sealbus.fd_count() <= baseline), (baseline, fd_links(sealbus.pid))
        bus_serves_new_clients(sealbus, 1)
    reap(proc)


# -- (c) a uid over its share of queued closes is disconnected and refused; others are served -------

SHARE_CONFIG = """<busconfig><type>session</type>
  <policy context="default"><allow user="*"/><allow send_destination="*" eavesdrop="true"/>
  <allow eavesdrop="true"/><allow own="*"/></policy>
  <limit name="max_inflight_fds_per_user">20</limit></busconfig>"""


@pytest.mark.timeout(90)
def test_uid_over_its_close_share_is_disconnected(sealbus_factory, test_users, tmp_path):
    from jeepney import message_bus
    from jeepney.io.blocking import open_dbus_connection

    conf = tmp_path / "share.conf"
    conf.write_text(SHARE_CONFIG)
    bus = sealbus_factory("--config", str(conf))
    attacker, other = test_users
    with ExitStack() as st:
        mnt = st.enter_context(hostile())
        proc, lines = st.enter_context(sender(attacker, bus, mnt / "f", 10, msgs=3))
        proc.stdin.write("\n")
        proc.stdin.flush()
        after = [proc.stdout.readline().strip() for _ in range(2)]
        assert after[0].startswith("disconnected"), (lines, after)
        assert after[1].startswith("refused"), (lines, after)
        log = Path(bus.log_path).read_text()
        assert f"uid={attacker.pw_uid} pid=" in log and "fds waiting to be closed" in log, log
        # another user is served, fds included (a regular file: its close goes to a free worker)
        script = ("import os, sys\nfrom jeepney import DBusAddress, new_method_call, message_bus\n"
                  "from jeepney.io.blocking import open_dbus_connection\n"
                  "c = open_dbus_connection(sys.argv[1], enable_fds=True)\n"
                  "c.send_and_get_reply(message_bus.GetId(), timeout=5)\n"
                  "fd = os.open('/etc/passwd', os.O_RDONLY)\n"
                  "a = DBusAddress('/', bus_name='org.sealbus.Test.Nobody', interface='org.sealbus.Test')\n"
                  "r = c.send_and_get_reply(new_method_call(a, 'Take', 'h', (fd,)), timeout=5)\n"
                  "print(r.header.fields.get(4))\n")  # fmt: skip
        out = subprocess.run([sys.executable, "-c", script, bus.address], capture_output=True, text=True,
                             timeout=30, preexec_fn=lambda: (os.setgroups([]), os.setgid(other.pw_gid),
                                                             os.setuid(other.pw_uid)), cwd="/")  # fmt: skip
        assert out.stdout.strip() == "org.freedesktop.DBus.Error.ServiceUnknown", out.stderr
        root = open_dbus_connection(bus.address)
        root.send_and_get_reply(message_bus.GetId(), timeout=5)
        root.close()
    reap(proc)
    # the server died: the stuck closes returned, the charge drained, the uid may connect again
    assert wait_until(lambda: _connects_as(attacker, bus), interval=0.05)


def _connects_as(user, bus) -> bool:
    script = ("import sys\nfrom jeepney import message_bus\nfrom jeepney.io.blocking import open_dbus_connection\n"
              "open_dbus_connection(sys.argv[1]).send_and_get_reply(message_bus.GetId(), timeout=5)\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", script, bus.address], capture_output=True, timeout=30, cwd="/",
                         preexec_fn=lambda: (os.setgroups([]), os.setgid(user.pw_gid), os.setuid(user.pw_uid)))  # fmt: skip
    return out.returncode == 0


# -- the core records close actions; the shell performs them -----------------------------------------


def test_core_records_fds_to_close_instead_of_closing_them(core):
    from broker.wire.message import HeaderView, build_message

    from .conftest import CoreClient

    a, b = CoreClient(core), CoreClient(core, uid=1001)
    r, w = os.pipe()
    try:
        raw = build_message(1, 7, destination=b.name, path="/", member="Take", signature="h", body=(0,),
                            unix_fds=1)  # fmt: skip
        core.dispatch(a.peer, (HeaderView(memoryview(raw)), [r]))
        assert core.closing == []  # the copy queued to b still holds it
        assert len(b.take()) == 1  # written: the last reference is gone
        assert core.closing == [([r], a.peer)]  # an action for the shell, charged to the sender
        os.fstat(r)  # and still open: the core closed nothing
        a.call("GetId")
        a.take()
        assert len(core.closing) == 1  # no fds, no action
    finally:
        os.close(r)
        os.close(w)


# -- the classifier inside the broker's sandbox (Landlock + seccomp) ---------------------------------

SANDBOXED = r"""
import os, socket, sys
import pyseccomp  # imported before Landlock shuts the venv
from broker.client.memfd import seal
from broker.launch import sandbox
from broker.payload.vet import classifier
import pwd
f = os.open("/etc/passwd", os.O_RDONLY)
r, w = os.pipe()
a, b = socket.socketpair()
m = seal(b"x")
u = pwd.getpwnam("sealbus")
sandbox.drop_privileges(u.pw_uid, u.pw_gid)
assert sandbox.apply_landlock(True) and sandbox.apply_seccomp(True)
print(classifier.close_key(f), classifier.close_key(r), classifier.close_key(a.fileno()), classifier.close_key(m))
"""


def test_classifier_works_in_the_broker_sandbox():
    """The sandboxed broker still reads /proc/self/fd and fdinfo: a regular file is keyed by its mount
    (the closer's fairness needs it), pipes, unix sockets and memfds are closed at once; nothing is killed
    by seccomp."""
    from broker.payload.vet import classifier

    fd = os.open("/etc/passwd", os.O_RDONLY)
    try:
        want = classifier.mnt_id(fd)
    finally:
        os.close(fd)
    out = subprocess.run([sys.executable, "-c", SANDBOXED], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, (out.returncode, out.stderr)
    assert out.stdout.split() == [str(want), "None", "None", "None"], out.stdout
    assert out.returncode != -signal.SIGSYS


# -- the same in the privilege-separated system bus (Landlock + seccomp broker) ----------------------


@pytest.mark.timeout(120)
def test_system_bus_broker_keeps_closing_behind_a_stuck_private_mount(test_users):
    """`sealbus run --system`: the sandboxed broker classifies a user's private FUSE file (it cannot stat
    it) by its mount through /proc/self/fdinfo, so another user's regular files are still closed: had the
    sandbox hidden fdinfo, both would share one "unknown" queue behind the stuck close."""
    from .test_privsep import SystemBus

    bus = SystemBus()
    bus.path = bus.socket  # what RawClient connects to
    try:
        attacker, other = test_users
        with ExitStack() as st:
            mnt = st.enter_context(hostile(attacker))
            proc, lines = st.enter_context(sender(attacker, bus, mnt / "f", 3))
            assert lines[0].startswith("reply"), lines
            bus_serves_new_clients(bus)
            count = lambda: len(os.listdir(f"/proc/{bus.broker_pid}/fd"))  # noqa: E731
            script = ("import os, sys\nfrom jeepney import DBusAddress, new_method_call, message_bus\n"
                      "from jeepney.io.blocking import open_dbus_connection\n"
                      "c = open_dbus_connection(sys.argv[1], enable_fds=True)\n"
                      "c.send_and_get_reply(message_bus.GetId(), timeout=5)\n"
                      "print('ready', flush=True)\nsys.stdin.readline()\n"
                      "a = DBusAddress('/', bus_name='org.sealbus.Test.Nobody', interface='org.sealbus.Test')\n"
                      "fds = [os.open('/etc/passwd', os.O_RDONLY) for _ in range(8)]\n"
                      "r = c.send_and_get_reply(new_method_call(a, 'Take', 'h' * 8, tuple(fds)), timeout=5)\n"
                      "print(r.header.fields.get(4), flush=True)\nsys.stdin.readline()\n")  # fmt: skip
            victim = popen_as(other, [sys.executable, "-c", script, bus.address], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd="/")  # fmt: skip
            st.callback(victim.kill)
            assert victim.stdout.readline().strip() == "ready"
            baseline = count()
            victim.stdin.write("\n")
            victim.stdin.flush()
            assert victim.stdout.readline().strip() == "org.freedesktop.DBus.Error.ServiceUnknown"
            assert wait_until(lambda: count() <= baseline), (baseline, fd_links(bus.broker_pid))
        reap(proc)
    finally:
        assert bus.stop() == 0, bus.logtext()[-3000:]
