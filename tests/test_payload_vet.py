"""Broker-side fd vetting on real fds: every refused kind, in every mode, with the fd index in the message."""

import array
import fcntl
import os
import socket

import pytest

from broker.client.memfd import memfd_create, seal
from broker.payload.seals import seal_names
from broker.payload.vet import (
    E_REFUSED,
    E_UNSEALED,
    SAFE_FSTYPES,
    FdClassifier,
    FdRefused,
    PayloadStats,
    VetContext,
    classifier,
    close_may_block,
    fd_stat,
    vet_fds,
)

# Protocol constants pinned here (the kernel's <linux/fcntl.h>, kdbus's four seals), not imported
# from the implementation: a wrong value there must fail these tests, not move them along.
F_ADD_SEALS = 1033
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 0x1, 0x2, 0x4, 0x8
F_SEAL_FUTURE_WRITE, F_SEAL_EXEC = 0x10, 0x20
PAYLOAD_SEALS = 0xF  # SHRINK | GROW | WRITE | SEAL

MODES = ("any", "sealed", "none")


@pytest.fixture
def fds():
    """Collects fds a test opens and closes them afterwards."""
    opened: list[int] = []
    yield opened
    for fd in opened:
        try:
            os.close(fd)
        except OSError:
            pass


def ctx(**kw) -> VetContext:
    # own_pids empty: the test process makes socketpairs itself; a real broker lists its own pid
    kw.setdefault("own_pids", set())
    return VetContext(**kw)


def memfd_with(fds, seals: int, data: bytes = b"payload") -> int:
    fd = memfd_create("t")
    fds.append(fd)
    os.write(fd, data)
    if seals:
        fcntl.fcntl(fd, F_ADD_SEALS, seals)
    return fd


def refused(fdlist, mode, c=None) -> FdRefused:
    with pytest.raises(FdRefused) as ei:
        vet_fds(fdlist, mode, c or ctx())
    return ei.value


def test_fully_sealed_memfd_passes_every_mode_but_none(fds):
    fd = memfd_with(fds, PAYLOAD_SEALS, b"x" * 1000)
    for mode in ("any", "sealed"):
        [info] = vet_fds([fd], mode, ctx())
        assert (info.kind, info.size, info.seals & PAYLOAD_SEALS) == ("memfd", 1000, PAYLOAD_SEALS)
    e = refused([fd], "none")
    assert e.error_name == E_REFUSED and "fd #0" in e.message and "none" in e.message


@pytest.mark.parametrize(
    "seals",
    [0, PAYLOAD_SEALS & ~F_SEAL_SHRINK, PAYLOAD_SEALS & ~F_SEAL_GROW, PAYLOAD_SEALS & ~F_SEAL_WRITE,
     PAYLOAD_SEALS & ~F_SEAL_SEAL, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL],
    ids=["unsealed", "no-shrink", "no-grow", "no-write", "no-seal", "future-write-instead-of-write"],
)  # fmt: skip
def test_sealed_mode_names_the_missing_seal(fds, seals):
    fd = memfd_with(fds, seals)
    good = memfd_with(fds, PAYLOAD_SEALS)
    e = refused([good, fd], "sealed")
    assert e.error_name == E_UNSEALED
    assert "fd #1" in e.message  # the second fd argument is the culprit
    assert f"missing seals {seal_names(PAYLOAD_SEALS & ~seals)} " in e.message, e.message
    assert vet_fds([fd], "any", ctx())[0].kind == "memfd"  # `any` is dbus-daemon compatible


def test_regular_writable_file(fds, tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    fds.append(fd)
    e = refused([fd], "sealed")
    assert e.error_name == E_UNSEALED and "file" in e.message
    assert vet_fds([fd], "any", ctx())[0].kind == "file"


def test_pipe(fds):
    r, w = os.pipe()
    fds += [r, w]
    e = refused([r], "sealed")
    assert e.error_name == E_REFUSED and "pipe" in e.message
    assert vet_fds([r, w], "any", ctx())[0].kind == "pipe"


@pytest.mark.parametrize("mode", MODES)
def test_directory_refused_in_every_mode(fds, tmp_path, mode):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    fds.append(fd)
    e = refused([fd], mode)
    assert e.error_name == E_REFUSED and "director" in e.message and e.reason == "directory"


@pytest.mark.parametrize("mode", MODES)
def test_o_path_refused_in_every_mode(fds, tmp_path, mode):
    (tmp_path / "f").write_bytes(b"x")
    fd = os.open(tmp_path / "f", os.O_PATH)
    fds.append(fd)
    assert refused([fd], mode).reason == "o_path"


@pytest.mark.parametrize("mode", MODES)
def test_bus_listening_socket_refused_in_every_mode(tmp_path, mode):
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(tmp_path / "bus"))
    lsock.listen()
    st = os.fstat(lsock.fileno())
    c = ctx(listening={(st.st_dev, st.st_ino)})
    e = refused([lsock.fileno()], mode, c)
    assert e.error_name == E_REFUSED and e.reason == "bus_socket" and "listening" in e.message
    # another listening socket is just a socket in `any` mode
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(tmp_path / "other"))
    other.listen()
    if mode == "any":
        assert vet_fds([other.fileno()], mode, c)[0].kind == "socket"
    lsock.close()
    other.close()


@pytest.mark.parametrize("mode", MODES)
def test_unix_socket_with_queued_fds_refused_in_every_mode(fds, mode):
    a, b = socket.socketpair()
    r, w = os.pipe()
    fds += [r, w]
    # b's receive queue now holds an fd in flight
    a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
    e = refused([b.fileno()], mode)
    assert e.error_name == E_REFUSED and e.reason == "socket_queue" and "in flight" in e.message
    # the vetter did not receive anything: the fd is still queued
    _, anc, _, _ = b.recvmsg(1, socket.CMSG_SPACE(4))
    assert anc and anc[0][1] == socket.SCM_RIGHTS
    for _level, _kind, raw in anc:
        fds.extend(array.array("i", raw))
    # with its queue drained, the same socket passes in `any` mode (dbus-daemon compatible)
    if mode == "any":
        assert vet_fds([b.fileno()], mode, ctx())[0].kind == "socket"
    a.close()
    b.close()


def test_connection_to_the_bus_itself_refused():
    a, b = socket.socketpair()  # SO_PEERCRED of either end: this process
    e = refused([a.fileno()], "any", VetContext(own_pids={os.getpid()}))
    assert e.reason == "bus_connection"
    assert vet_fds([a.fileno()], "any", VetContext(own_pids={1}))[0].kind == "socket"
    a.close()
    b.close()


def test_tcp_socket_with_queued_data_is_not_a_unix_socket():
    srv = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    cli.sendall(b"data")
    conn.recv(0)
    assert vet_fds([conn.fileno()], "any", ctx())[0].kind == "socket"  # cannot carry fds
    for s in (srv, cli, conn):
        s.close()


def test_sealed_mode_accepts_payload_snapshots_only_read_only(fds, tmp_path):
    p = tmp_path / "snap"
    p.write_bytes(b"snapshot")
    st = os.stat(p)
    snaps = {(st.st_dev, st.st_ino)}
    c = ctx(is_payload_snapshot=lambda dev, ino: (dev, ino) in snaps)
    ro = os.open(p, os.O_RDONLY)
    rw = os.open(p, os.O_RDWR)
    fds += [ro, rw]
    [info] = vet_fds([ro], "sealed", c)
    assert (info.kind, info.size) == ("payload-snapshot", 8)
    assert refused([rw], "sealed", c).error_name == E_UNSEALED
    assert refused([ro], "sealed", ctx()).error_name == E_UNSEALED  # unknown to the store: just a file


def test_fd_stat_matches_fstat(fds, tmp_path):
    fd = memfd_with(fds, 0, b"abc")
    st = os.fstat(fd)
    assert fd_stat(fd) == (st.st_mode, 3, st.st_dev, st.st_ino)


def test_vet_never_reads_payload_bytes(fds):
    """Vetting a pipe leaves its contents where they were (no read, no peek)."""
    r, w = os.pipe()
    fds += [r, w]
    os.write(w, b"secret")
    vet_fds([r], "any", ctx())
    assert os.read(r, 100) == b"secret"


def test_unknown_mode_is_an_error(fds):
    with pytest.raises(ValueError):
        vet_fds([], "sometimes", ctx())


def test_stats_counters(fds):
    stats = PayloadStats()
    sealed = seal(b"y" * 4096)
    fds.append(sealed)
    stats.record(vet_fds([sealed], "sealed", ctx()), copies=50)
    stats.refused["unsealed"] += 1
    d = stats.as_dict()
    assert d["payloads_forwarded"] == 50
    assert d["bytes_without_copy"] == 50 * 4096
    assert d["sealed_payloads"] == 50
    assert d["refused_unsealed"] == 1


@pytest.mark.root
@pytest.mark.timeout(30)
def test_close_may_block(fds, tmp_path, hostile_fuse):
    fuse_fd = os.open(hostile_fuse / "f", os.O_RDONLY)  # never closed by us: it would hang until teardown
    assert close_may_block(fuse_fd)
    assert vet_fds([fuse_fd], "any", ctx())[0].kind == "file"  # vetting itself never blocks on FUSE
    assert refused([fuse_fd], "sealed").error_name == E_UNSEALED
    r, w = os.pipe()
    fds += [r, w, memfd_with(fds, PAYLOAD_SEALS)]
    a, b = socket.socketpair()
    tcp = socket.create_server(("127.0.0.1", 0))
    assert not close_may_block(fds[-1])
    assert not close_may_block(r)
    assert not close_may_block(a.fileno())
    assert close_may_block(tcp.fileno())  # SO_LINGER can make close() wait
    fds.append(os.open("/dev/null", os.O_RDONLY))
    assert close_may_block(fds[-1])
    for s in (a, b, tcp):
        s.close()


@pytest.fixture
def hostile_fuse(tmp_path):
    """A FUSE mount whose server never answers FLUSH (so close() of its file blocks until teardown)."""
    from tests import hostile_fuse as hf

    if os.geteuid() != 0:
        pytest.skip("mounting FUSE needs root here")
    (tmp_path / "hostile").mkdir()
    with hf.mount(tmp_path / "hostile") as mnt:
        yield mnt


# -- the close classifier: nothing it cannot prove harmless is closed on the loop ---------------------


def fd_from_user(user, path):
    """An fd of ``path`` opened by ``user`` (root cannot open a private FUSE mount), passed to us."""
    import subprocess
    import sys

    ours, theirs = socket.socketpair()
    script = ("import os, socket, sys\ns = socket.socket(fileno=int(sys.argv[2]))\n"
              "socket.send_fds(s, [b'x'], [os.open(sys.argv[1], os.O_RDONLY)])\nsys.stdin.readline()\n")  # fmt: skip

    def demote():
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    # it keeps its copy open until killed with the mount (its close would hang as well)
    proc = subprocess.Popen([sys.executable, "-c", script, str(path), str(theirs.fileno())], cwd="/",
                            pass_fds=[theirs.fileno()], preexec_fn=demote, stdin=subprocess.PIPE)  # fmt: skip
    theirs.close()
    try:
        ours.settimeout(20)
        _msg, got, _flags, _addr = socket.recv_fds(ours, 1, 1)
    finally:
        ours.close()
    return got[0], proc


@pytest.mark.timeout(60)
def test_a_private_fuse_file_may_block(test_users):
    """A user's own fusermount3 mount (no allow_other): stat fails with EACCES for everybody else, so the
    old classifier concluded "cannot block" and the broker closed it on its loop, hanging in FLUSH."""
    import tempfile

    from tests import hostile_fuse as hf

    d = tempfile.mkdtemp(prefix="sealbus-hostile-")
    os.chmod(d, 0o755)
    os.mkdir(f"{d}/mnt")
    try:
        with hf.mount(f"{d}/mnt", user=test_users[0]) as mnt:
            fd, proc = fd_from_user(test_users[0], f"{mnt}/f")  # never closed by us: it would hang
            try:
                with pytest.raises(PermissionError):
                    fd_stat(fd)
                assert close_may_block(fd)
                key = classifier.close_key(fd)
                assert isinstance(key, int) and classifier.fstype(key).startswith("fuse")
                assert refused([fd], "any").reason == "stat"  # vetting refuses it, without blocking either
            finally:
                proc.kill()
    finally:
        os.rmdir(f"{d}/mnt")
        os.rmdir(d)


def test_close_keys_name_the_filesystem(fds, tmp_path, hostile_fuse):
    """What may block is keyed by its mount (the closer serves mounts fairly); safe kinds are None."""
    fuse_fd = os.open(hostile_fuse / "f", os.O_RDONLY)  # never closed by us: it would hang until teardown
    fds.append(os.open(__file__, os.O_RDONLY))
    disk = classifier.close_key(fds[-1])
    fuse = classifier.close_key(fuse_fd)
    assert isinstance(disk, int) and isinstance(fuse, int) and disk != fuse
    assert classifier.fstype(fuse) == "fuse" and classifier.fstype(disk) not in SAFE_FSTYPES
    r, w = os.pipe()
    fds += [r, w, os.eventfd(0), os.pidfd_open(os.getpid())]
    m = memfd_with(fds, 0)  # (appended by the helper)
    shm = os.open("/dev/shm", os.O_RDONLY | os.O_DIRECTORY)  # a tmpfs directory: known by its mount
    fds.append(shm)
    for fd in (r, w, fds[-4], fds[-3], m, shm):
        assert classifier.close_key(fd) is None, os.readlink(f"/proc/self/fd/{fd}")
    tcp = socket.create_server(("127.0.0.1", 0))
    assert classifier.close_key(tcp.fileno()) == "socket"
    tcp.close()
    assert classifier.close_key(123456) is None  # not open: close() returns at once


def test_mount_table_is_reread_only_when_it_changed(fds, tmp_path):
    """A mount made after the table was read is found (re-read on an unknown mnt_id, once the kernel says
    the table changed); an unknown mnt_id with no change since costs no re-read."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    c = FdClassifier()
    c.prepare()
    reads = []
    real = c._read_mounts
    c._read_mounts = lambda: (reads.append(1), real())
    assert c.fstype(10**9) is None and c.fstype(10**9 + 1) is None
    assert reads == []  # nothing changed: no re-read
    mnt = tmp_path / "ram"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)], check=True)
    try:
        fd = os.open(mnt / "x", os.O_RDWR | os.O_CREAT, 0o600)
        fds.append(fd)
        assert c.close_key(fd) is None  # ramfs: no seals, known safe through the (re-read) mount table
        assert reads == [1]
        assert c.close_key(fd) is None and reads == [1]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
