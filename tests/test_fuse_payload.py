"""The FUSE payload filesystem on a real mount, driven by real processes of other uids.

Each test mounts a fresh payload fs the way the launcher does (root opens
/dev/fuse and mount(2)s it with fd=N,...,allow_other,default_permissions),
serves it from this test's trio loop with serve_payload_fs, and runs clients
(tests/fuse_actor.py) as two unprivileged test users. Claim runs in this
process, like the broker's driver will. A watchdog thread asserts the
serving loop never stops answering (and aborts the FUSE connection if it did,
so a failure cannot wedge the machine).
"""

import ctypes
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import asynccontextmanager

import pytest
import trio

from broker.io.fuse import serve_payload_fs
from broker.launch.payload_mount import mount_payload_fs
from broker.payload.claim import claim
from broker.payload.store import (
    ClaimError,
    Limits,
    PayloadStore,
)
from broker.payload.vet import VetContext, fd_stat, vet_fd

from .conftest import ensure_test_users

# The error names of the protocol (exact, as clients match on them), pinned here, not imported
# from the implementation.
E_COOKIE_UNKNOWN = "org.sealbus.Error.CookieUnknown"
E_COOKIE_EXPIRED = "org.sealbus.Error.CookieExpired"
E_COOKIE_FOREIGN = "org.sealbus.Error.CookieForeign"
E_COOKIE_USED = "org.sealbus.Error.CookieUsed"

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts FUSE and runs clients as other users: needs root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
    pytest.mark.timeout(60),
]

ACTOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuse_actor.py")
CONNS = "/sys/fs/fuse/connections"
_libc = ctypes.CDLL(None, use_errno=True)
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MNT_DETACH = 2


def pattern(n: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(f"payload-{seed}".encode()).digest(n) if n else b""


class Watchdog:
    """A trio heartbeat checked from another thread: the loop must never stall."""

    def __init__(self, limit: float = 2.0):
        self.limit = limit
        self.last = time.monotonic()
        self.worst = 0.0
        self.conn: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    async def heartbeat(self):
        while True:
            self.last = time.monotonic()
            await trio.sleep(0.02)

    def _watch(self):
        while not self._stop.wait(0.05):
            gap = time.monotonic() - self.last
            self.worst = max(self.worst, gap)
            if gap > 5 and self.conn:  # wedged: free the loop so the test fails instead of hanging
                abort(self.conn)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()


def abort(conn: str) -> None:
    try:
        with open(os.path.join(CONNS, conn, "abort"), "w") as f:
            f.write("1")
    except OSError:
        pass


def mount_conn(path: str) -> str | None:
    """The fusectl connection of the mount at path (its anonymous device's minor), from mountinfo."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" ")
            if fields[4] == path:
                return fields[2].split(":")[1]
    return None


class Mounted:
    def __init__(self, store: PayloadStore, mount: str, watchdog: Watchdog):
        self.store = store
        self.mount = mount
        self.watchdog = watchdog


@asynccontextmanager
async def mounted(limits: Limits | None = None, *, via: str = "fd", backing_dir_fd: int | None = None):
    """A served payload fs; always unmounted and aborted on the way out."""
    if not os.path.ismount(CONNS):
        subprocess.run(["mount", "-t", "fusectl", "none", CONNS], check=False)
    mnt = tempfile.mkdtemp(prefix="sealbus-fs-")
    os.chmod(mnt, 0o755)
    store = PayloadStore(limits=limits or Limits(timeout_s=30), backing_dir_fd=backing_dir_fd)
    wd = Watchdog()
    fuse_fd = None
    if via == "fd":
        fuse_fd = mount_payload_fs(mnt, 0, 0)  # what the launcher does
    done = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            cs = trio.CancelScope()

            async def serve(task_status=trio.TASK_STATUS_IGNORED):
                try:
                    with cs:
                        await serve_payload_fs(
                            store, mnt, fuse_fd=None if fuse_fd is None else os.dup(fuse_fd), task_status=task_status
                        )
                finally:
                    done.set()

            nursery.start_soon(wd.heartbeat)
            wd.conn = mount_conn(mnt)
            wd.start()
            with trio.fail_after(10):
                await nursery.start(serve)
            wd.conn = str(os.minor(store.st_dev))
            try:
                yield Mounted(store, mnt, wd)
            finally:
                cs.cancel()
                with trio.move_on_after(5):
                    await done.wait()
                nursery.cancel_scope.cancel()
    finally:
        wd.conn = mount_conn(mnt)  # still mounted (launcher-style mounts are not unmounted by the server)
        _libc.umount2(mnt.encode(), MNT_DETACH)
        if wd.conn:
            abort(wd.conn)  # ends any request still waiting; safe: we hold the /dev/fuse fd, so the number is ours
        if fuse_fd is not None:
            os.close(fuse_fd)
        wd.stop()
        os.rmdir(mnt)
    assert wd.worst < wd.limit, f"the serving trio loop stalled for {wd.worst:.2f}s"


class Actor:
    """A fuse_actor.py process running as another user."""

    def __init__(self, proc, sock=None):
        self.proc = proc
        self.sock = sock
        self._buf = b""

    async def __call__(self, op: str, **kw):
        await self.proc.stdin.send_all(json.dumps({"op": op, **kw}).encode() + b"\n")
        with trio.fail_after(20):
            while b"\n" not in self._buf:
                chunk = await self.proc.stdout.receive_some()
                if not chunk:
                    raise EOFError("actor died")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        reply = json.loads(line)
        assert "exc" not in reply, reply
        return reply

    async def ok(self, op: str, **kw):
        reply = await self(op, **kw)
        assert "ok" in reply, (op, reply)
        return reply["ok"]


@asynccontextmanager
async def actor(user):
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = await trio.lowlevel.open_process(
        [sys.executable, ACTOR, str(child.fileno())], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        user=user.pw_uid, group=user.pw_gid, extra_groups=[], pass_fds=(child.fileno(),), cwd="/")  # fmt: skip
    child.close()
    a = Actor(proc, parent)
    try:
        yield a
    finally:
        await proc.stdin.aclose()
        with trio.move_on_after(5):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        parent.close()


@pytest.fixture
def users():
    return ensure_test_users()


async def wait_for(cond, timeout: float = 3.0) -> None:
    """RELEASE reaches the server asynchronously after a client's close()."""
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.02)


async def close_fd(fd: int) -> None:
    await trio.to_thread.run_sync(os.close, fd)


# -- the protocol end to end ------------------------------------------------------------------------------


async def test_full_dance_other_uid_reads_identical_bytes(users):
    """mkstemp, unlink, mmap write + msync, seal, cookie, Claim; another uid reads the same bytes, cannot write."""
    size = 3 * 1024 * 1024 + 17
    async with mounted() as m, actor(users[0]) as sender, actor(users[1]) as receiver:
        made = await sender.ok("dance", mount=m.mount, size=size, seed=1)
        assert len(made["cookie"]) == 32 and int(made["cookie"], 16) >= 0
        fd, n = await claim(m.store, users[0].pw_uid, made["cookie"])
        assert n == size
        # What the bus's fd vetting will see, without a FUSE round-trip from this (the serving) thread.
        mode, fsize, dev, ino = fd_stat(fd)
        assert m.store.is_snapshot(dev, ino) and fsize == size
        info = vet_fd(fd, 0, "sealed", VetContext(is_payload_snapshot=m.store.is_snapshot))
        assert info.kind == "payload-snapshot"
        socket.send_fds(receiver.sock, [b"x"], [fd])
        got = await receiver.ok("recvfd")
        assert got["sha"] == made["sha"] == hashlib.sha256(pattern(size, 1)).hexdigest()
        assert got["size"] == size and got["uid"] == 0 and got["mode"] == 0o400
        assert got["write"] == "EBADF"
        assert got["mmap_write"] == "EACCES"
        assert got["reopen_rw"] == "EACCES"
        assert got["truncate"] in ("EINVAL", "EBADF")
        assert got["setxattr"] in ("EACCES", "EPERM")
        # The broker may close a snapshot fd from its loop thread: FLUSH is off, so this cannot wait on us.
        os.close(fd)


async def test_mounted_by_libfuse_itself(users):
    """The session-mode path: serve_payload_fs mounts (mount(2) as root, fusermount3 otherwise) and unmounts."""
    async with mounted(via="libfuse") as m, actor(users[0]) as a:
        with open("/proc/self/mountinfo") as f:
            line = next(x for x in f if x.split(" ")[4] == m.mount)
        assert {"nosuid", "nodev", "noexec"} <= set(line.split(" ")[5].split(","))
        assert "fuse.sealbus" in line and "default_permissions" in line and "allow_other" in line
        made = await a.ok("dance", mount=m.mount, size=4096, mmap=False, seed=2)
        fd, n = await claim(m.store, users[0].pw_uid, made["cookie"])
        assert n == 4096
        data = await trio.to_thread.run_sync(os.pread, fd, 8192, 0)
        assert data == pattern(4096, 2)
        await close_fd(fd)


async def test_file_backed_store_end_to_end(users, tmp_path):
    """Contents in an unlinked file of a broker-private directory instead of memory."""
    priv = tmp_path / "store"
    priv.mkdir(mode=0o700)
    dfd = os.open(priv, os.O_RDONLY | os.O_DIRECTORY)
    try:
        async with mounted(backing_dir_fd=dfd) as m, actor(users[0]) as a, actor(users[1]) as b:
            made = await a.ok("dance", mount=m.mount, size=2 * 1024 * 1024, seed=7)
            assert os.listdir(priv) == []
            fd, n = await claim(m.store, users[0].pw_uid, made["cookie"])
            socket.send_fds(b.sock, [b"x"], [fd])
            got = await b.ok("recvfd")
            assert got["sha"] == made["sha"] and got["write"] == "EBADF"
            await close_fd(fd)
    finally:
        os.close(dfd)


async def test_tmp_files_private_and_root_holds_only_tmp(users):
    async with mounted() as m, actor(users[0]) as a, actor(users[1]) as b:
        assert await b.ok("listdir", path=m.mount) == ["tmp"]
        st = await a.ok("mkstemp", mount=m.mount, name="secret")
        assert st["mode"] == 0o600 and st["uid"] == users[0].pw_uid  # asked for 0644, got 0600
        path = os.path.join(m.mount, "tmp", "secret")
        assert (await b("listdir", path=os.path.join(m.mount, "tmp"))) == {"errno": "EACCES"}
        assert (await b("open", path=path)) == {"errno": "ENOENT"}  # guessing the name gives nothing
        assert (await b("stat", path=path)) == {"errno": "ENOENT"}
        assert (await b("unlink", path=path)) == {"errno": "ENOENT"}
        assert (await b("rename", src=path, dst=path + "2"))["errno"] in ("ENOENT", "EPERM")
        assert (await b("link", src=path, dst=os.path.join(m.mount, "tmp", "mine")))["errno"] in ("ENOENT", "EPERM")
        # Creating the same name is refused without revealing anything but that it exists.
        assert (await b("mkstemp", mount=m.mount, name="secret")) == {"errno": "EEXIST"}
        # The owner itself can do nothing but write, seal and unlink.
        assert (await a("rename", src=path, dst=path + "2")) == {"errno": "EPERM"}
        assert (await a("mkstemp", mount=m.mount, name="../x"))["errno"] in ("EACCES", "EEXIST", "EPERM")
        for op in ("mkdir", "symlink", "mknod"):
            assert (await a(op, path=os.path.join(m.mount, "tmp", op))) == {"errno": "EPERM"}
        # The hidden snapshot directory is invisible to clients.
        assert (await a("listdir", path=os.path.join(m.mount, ".sealbus-snapshots"))) == {"errno": "ENOENT"}
        assert await a.ok("stat", path=path)
        assert await a.ok("unlink", path=path)


async def test_foreign_claim_unknown_twice_and_after_expiry(users):
    async with mounted(Limits(timeout_s=0.4)) as m, actor(users[0]) as a:
        made = await a.ok("dance", mount=m.mount, size=1000, seed=3)
        with pytest.raises(ClaimError) as e:
            await claim(m.store, users[1].pw_uid, made["cookie"])
        assert e.value.error_name == E_COOKIE_FOREIGN
        with pytest.raises(ClaimError) as e:
            await claim(m.store, users[0].pw_uid, "0" * 32)
        assert e.value.error_name == E_COOKIE_UNKNOWN
        fd, n = await claim(m.store, users[0].pw_uid, made["cookie"])  # the foreign try did not burn it
        await close_fd(fd)
        with pytest.raises(ClaimError) as e:
            await claim(m.store, users[0].pw_uid, made["cookie"])
        assert e.value.error_name == E_COOKIE_USED
        late = await a.ok("dance", mount=m.mount, size=1000, seed=4)
        await a.ok("close", fd=late["fd"])  # closing before claiming is fine, but waiting too long is not
        # expiry (0.4 s) has run once the store remembers the cookie as expired
        await wait_for(lambda: m.store.tombstones.get(late["cookie"], ("",))[0] == "expired", timeout=2.0)
        with pytest.raises(ClaimError) as e:
            await claim(m.store, users[0].pw_uid, late["cookie"])
        assert e.value.error_name == E_COOKIE_EXPIRED
        await a.ok("close", fd=made["fd"])
        await wait_for(lambda: m.store.usage(users[0].pw_uid) == (0, 0))


async def test_write_after_seal_fd_and_mapping_snapshot_keeps_sealed_bytes(users):
    size = 64 * 1024
    sealed = pattern(size, 5)
    async with mounted() as m, actor(users[0]) as a, actor(users[1]) as b:
        f = await a.ok("mkstemp", mount=m.mount, name="p")
        await a.ok("unlink", path=os.path.join(m.mount, "tmp", "p"))
        await a.ok("map", fd=f["fd"], size=size)
        await a.ok("mapwrite", fd=f["fd"], off=0, hex=sealed.hex())
        assert (await a("cookie", fd=f["fd"])) == {"errno": "ENODATA"}
        await a.ok("seal", fd=f["fd"])
        cookie = await a.ok("cookie", fd=f["fd"])
        assert (await a("write", fd=f["fd"], hex="41")) == {"errno": "EPERM"}
        assert (await a("truncate", fd=f["fd"], size=1)) == {"errno": "EPERM"}
        assert (await a("setxattr", fd=f["fd"], name="user.sealbus.seal")) == {"errno": "EPERM"}
        assert (await a("setxattr", fd=f["fd"], name="user.other")) == {"errno": "EPERM"}
        # The still-writable mapping: the page changes locally, write-back is refused.
        r = await a("mapwrite", fd=f["fd"], off=0, hex=("42" * 4096))
        assert r.get("errno") in (None, "EPERM", "EIO")
        fd, n = await claim(m.store, users[0].pw_uid, cookie)
        socket.send_fds(b.sock, [b"x"], [fd])
        got = await b.ok("recvfd")
        assert got["sha"] == hashlib.sha256(sealed).hexdigest() and n == size
        await close_fd(fd)


async def test_quota_fill_does_not_affect_other_uids(users):
    lim = Limits(bytes_per_user=1 << 20, files_per_user=8, total_bytes=3 << 20, timeout_s=30)
    async with mounted(lim) as m, actor(users[0]) as a, actor(users[1]) as b:
        f = await a.ok("mkstemp", mount=m.mount, name="big")
        total, err = await a.ok("fill", fd=f["fd"], chunk=65536, max=8 << 20)
        assert err == "EDQUOT" and total == 1 << 20
        made, err = await a.ok("many", mount=m.mount, prefix="f", n=50)
        assert err == "EDQUOT" and made == 7  # 8 files per uid, one already made
        # The other uid is unaffected.
        got = await b.ok("dance", mount=m.mount, size=512 * 1024, seed=6)
        fd, n = await claim(m.store, users[1].pw_uid, got["cookie"])
        assert n == 512 * 1024
        await close_fd(fd)


async def test_whole_store_bound(users):
    lim = Limits(bytes_per_user=1 << 20, total_bytes=1 << 20, timeout_s=30)
    async with mounted(lim) as m, actor(users[0]) as a, actor(users[1]) as b:
        f = await a.ok("mkstemp", mount=m.mount, name="a")
        await a.ok("fill", fd=f["fd"], chunk=65536, max=768 * 1024)
        g = await b.ok("mkstemp", mount=m.mount, name="b")
        total, err = await b.ok("fill", fd=g["fd"], chunk=65536, max=1 << 20)
        assert err == "ENOSPC" and total == 256 * 1024


async def test_never_sealed_files_expire(users):
    async with mounted(Limits(timeout_s=1.0, files_per_user=21)) as m, actor(users[0]) as a:
        made, err = await a.ok("many", mount=m.mount, prefix="n", n=20, size=1000)
        assert (made, err) == (20, None)
        assert m.store.usage(users[0].pw_uid) == (20 * 1000, 20)
        # One still open and unsealed is kept: its creator is still writing.
        f = await a.ok("mkstemp", mount=m.mount, name="open")
        assert (await a("mkstemp", mount=m.mount, name="extra")) == {"errno": "EDQUOT"}
        await wait_for(lambda: m.store.usage(users[0].pw_uid) == (0, 1), timeout=5)
        assert await a.ok("write", fd=f["fd"], hex="00" * 10) == 10
        made, err = await a.ok("many", mount=m.mount, prefix="again", n=5)
        assert (made, err) == (5, None)


def test_unprivileged_session_mount_via_fusermount3(users, tmp_path):
    """A non-root broker mounts with fusermount3, serves, claims from its own mount, unmounts."""
    user = users[0]
    mnt = tempfile.mkdtemp(prefix="sealbus-session-fs-")
    os.chown(mnt, user.pw_uid, user.pw_gid)
    script = os.path.join(os.path.dirname(ACTOR), "fuse_session_server.py")
    try:
        proc = subprocess.Popen(
            [sys.executable, script, mnt],
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=[],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd="/",
        )
        try:
            stdout, stderr = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            conn = mount_conn(mnt)  # a wedged server sleeps uninterruptibly until its mount is aborted
            if conn:
                abort(conn)
            proc.kill()
            proc.communicate()
            raise
        assert proc.returncode == 0, stderr
        out = json.loads(stdout.splitlines()[-1])
        assert out == {"uid": user.pw_uid, "found": mnt, "same": True, "size": 100_000}
        assert mount_conn(mnt) is None  # unmounted on the way out
    finally:
        conn = mount_conn(mnt)  # (os.path.ismount cannot see it: root may not stat a mount without allow_other)
        if conn:
            abort(conn)
            _libc.umount2(mnt.encode(), MNT_DETACH)
        os.rmdir(mnt)


async def test_watchdog_is_not_vacuous():
    """The loop-responsiveness check used by every test here does fail when the loop stalls."""
    with pytest.raises(AssertionError, match="stalled"):
        async with mounted():
            time.sleep(2.3)  # deliberately blocks the serving loop


async def test_handler_bug_answers_eio_and_serving_continues(users):
    """A bug in one FUSE request costs that request (EIO), not the filesystem and the bus with it."""
    async with mounted() as m, actor(users[0]) as a:
        f = await a.ok("mkstemp", mount=m.mount, name="bug")
        real = m.store.write
        m.store.write = lambda *a: 1 // 0  # a real exception raised inside a real handler
        try:
            assert (await a("write", fd=f["fd"], hex="00")) == {"errno": "EIO"}
        finally:
            m.store.write = real
        assert await a.ok("write", fd=f["fd"], hex="00") == 1
