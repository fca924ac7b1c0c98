"""Vetting the fds a message carries, before the bus forwards them.

Only metadata is inspected (fcntl, statx, getsockopt); payload bytes are never
read. Some kinds are refused in every mode because forwarding them would let
a client attack the broker or a receiver; ``sealed`` mode additionally
accepts only payloads whose contents cannot change.
"""

import ctypes
import errno
import fcntl
import os
import select
import socket
import stat
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field

from .seals import PAYLOAD_SEALS, get_seals, seal_names

E_UNSEALED = "org.sealbus.Error.UnsealedPayload"
E_REFUSED = "org.sealbus.Error.FdRefused"

_AT_EMPTY_PATH = 0x1000
_AT_STATX_DONT_SYNC = 0x4000
_STATX_BASIC = 0x07FF
_libc = ctypes.CDLL(None, use_errno=True)
_statx = getattr(_libc, "statx", None)


class FdRefused(Exception):
    """A message's fd the bus will not forward; ``message`` names the fd argument and why."""

    def __init__(self, error_name: str, message: str, reason: str = "other"):
        super().__init__(message)
        self.error_name = error_name
        self.message = message
        self.reason = reason  # short key for the refusal counters


@dataclass
class FdInfo:
    kind: str  # memfd | payload-snapshot | file | pipe | socket | other
    size: int
    seals: int | None


@dataclass
class VetContext:
    """What the vetter must know about the broker itself."""

    listening: set = field(default_factory=set)  # (st_dev, st_ino) of the bus's own listening sockets
    is_payload_snapshot: object = None  # callable(st_dev, st_ino) -> bool, from the FUSE store
    # pids whose unix sockets are the bus's own (a client's connection to the bus has the listener's
    # pid as SO_PEERCRED); the launcher adds its pid when it listened on the broker's behalf
    own_pids: set = field(default_factory=lambda: {os.getpid()})


def fd_stat(fd: int):
    """(mode, size, dev, ino) without making FUSE call back into the broker.

    A plain fstat on a file of the broker's own payload filesystem may send a
    GETATTR request to the broker, which is blocked in this very call: a
    deadlock. statx with AT_STATX_DONT_SYNC takes the kernel's cached
    attributes instead.
    """
    if _statx is not None:
        buf = ctypes.create_string_buffer(256)
        r = _statx(fd, b"", _AT_EMPTY_PATH | _AT_STATX_DONT_SYNC, _STATX_BASIC, buf)
        if r == 0:
            raw = buf.raw
            mode = struct.unpack_from("<H", raw, 0x1C)[0]
            size = struct.unpack_from("<Q", raw, 0x28)[0]
            dev = os.makedev(*struct.unpack_from("<II", raw, 0x88))
            ino = struct.unpack_from("<Q", raw, 0x20)[0]
            return mode, size, dev, ino
        e = ctypes.get_errno()
        if e not in (errno.ENOSYS, errno.EINVAL):  # EACCES (a FUSE mount without allow_other)...: fstat
            raise OSError(e, os.strerror(e))  # would fail alike, or ask the FUSE server (GETATTR)
    st = os.fstat(fd)
    return st.st_mode, st.st_size, st.st_dev, st.st_ino


_SO_DOMAIN = getattr(socket, "SO_DOMAIN", 39)
_SIOCINQ = 0x541B  # == FIONREAD


def _unix_socket_state(fd: int) -> tuple[int, int] | None:
    """(queued bytes, SO_PEERCRED pid) of an AF_UNIX socket; None for other families.

    Only getsockopt/ioctl on the socket: nothing is received, so no fd in
    flight is ever installed in the broker.
    """
    sock = socket.socket(fileno=os.dup(fd))  # a wrapper for getsockopt; closing it closes only the dup
    try:
        if sock.getsockopt(socket.SOL_SOCKET, _SO_DOMAIN) != socket.AF_UNIX:
            return None
        try:
            queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), _SIOCINQ, b"\0\0\0\0"))[0]
        except OSError:  # EINVAL on a listening socket: its queue holds connections, not data
            queued = 0
        try:
            pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        except OSError:
            pid = 0
        return queued, pid
    finally:
        sock.close()


def vet_fd(fd: int, index: int, mode: str, ctx: VetContext) -> FdInfo:  # noqa: C901
    arg = f"fd #{index}"
    try:
        fmode, size, dev, ino = fd_stat(fd)
    except OSError as e:
        raise FdRefused(E_REFUSED, f"{arg}: cannot inspect it ({errno.errorcode.get(e.errno, e.errno)})", "stat")
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        flags = 0
    if flags & getattr(os, "O_PATH", 0o10000000):
        raise FdRefused(E_REFUSED, f"{arg}: O_PATH fds are refused (they name a file, not an open file)", "o_path")
    if stat.S_ISDIR(fmode):
        raise FdRefused(E_REFUSED, f"{arg}: directories are refused (a directory fd gives the receiver "
                        "openat() access to a tree)", "directory")  # fmt: skip
    if stat.S_ISBLK(fmode):
        raise FdRefused(E_REFUSED, f"{arg}: block devices are refused", "blockdev")
    if stat.S_ISSOCK(fmode):
        if (dev, ino) in ctx.listening:
            raise FdRefused(E_REFUSED, f"{arg}: the bus's own listening socket is refused (a receiver could "
                            "accept() connections meant for the bus)", "bus_socket")  # fmt: skip
        state = _unix_socket_state(fd)
        if state is not None:
            queued, peer_pid = state
            if queued > 0:
                raise FdRefused(E_REFUSED, f"{arg}: a unix socket with {queued} queued bytes is refused (the "
                                "queue may hold fds in flight: SCM_RIGHTS loops through the bus)",
                                "socket_queue")  # fmt: skip
            if peer_pid in ctx.own_pids:
                raise FdRefused(E_REFUSED, f"{arg}: a connection to this bus is refused (it would loop the "
                                "bus's own sockets through itself)", "bus_connection")  # fmt: skip
    if mode == "none":
        raise FdRefused(E_REFUSED, f"{arg}: this bus does not carry file descriptors (fd mode none)", "mode_none")
    seals = get_seals(fd) if stat.S_ISREG(fmode) else None
    if mode == "sealed":
        if seals is not None:
            missing = PAYLOAD_SEALS & ~seals
            if missing:
                raise FdRefused(E_UNSEALED, f"{arg}: payload is missing seals {seal_names(missing)} "
                                f"(has {seal_names(seals)}; sealed mode needs SHRINK|GROW|WRITE|SEAL)",
                                "unsealed")  # fmt: skip
            return FdInfo("memfd", size, seals)
        if stat.S_ISREG(fmode) and ctx.is_payload_snapshot is not None and ctx.is_payload_snapshot(dev, ino):
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise FdRefused(E_UNSEALED, f"{arg}: payload-fs file must be a read-only snapshot", "unsealed")
            return FdInfo("payload-snapshot", size, None)
        kind = "file" if stat.S_ISREG(fmode) else "pipe" if stat.S_ISFIFO(fmode) else "other"
        raise FdRefused(E_UNSEALED if kind == "file" else E_REFUSED,
                        f"{arg}: a {kind} is not a sealed payload (sealed mode accepts only memfds with "
                        "SHRINK|GROW|WRITE|SEAL and payload-fs snapshots)", f"not_sealed_{kind}")  # fmt: skip
    kind = "memfd" if seals is not None else "file" if stat.S_ISREG(fmode) else \
        "pipe" if stat.S_ISFIFO(fmode) else "socket" if stat.S_ISSOCK(fmode) else "other"  # fmt: skip
    return FdInfo(kind, size, seals)


def vet_fds(fds, mode: str, ctx: VetContext) -> list[FdInfo]:
    """Vet every fd of one message (index = position in the message's fd array); the first refusal wins."""
    if mode not in ("any", "sealed", "none"):
        raise ValueError(f"unknown fd mode {mode!r}")
    return [vet_fd(fd, i, mode, ctx) for i, fd in enumerate(fds)]


class PayloadStats:
    """Counters for Debug.Stats: what the bus carried without copying, and what it refused."""

    def __init__(self):
        self.payloads_forwarded = 0
        self.bytes_without_copy = 0
        self.sealed_payloads = 0
        self.refused = Counter()

    def record(self, infos: list[FdInfo], copies: int = 1) -> None:
        for i in infos:
            if i.kind in ("memfd", "payload-snapshot"):
                self.payloads_forwarded += copies
                self.bytes_without_copy += i.size * copies
                if i.seals is not None and (i.seals & PAYLOAD_SEALS) == PAYLOAD_SEALS:
                    self.sealed_payloads += copies

    def as_dict(self) -> dict[str, int]:
        out = {"payloads_forwarded": self.payloads_forwarded, "bytes_without_copy": self.bytes_without_copy,
               "sealed_payloads": self.sealed_payloads}  # fmt: skip
        for k, v in self.refused.items():
            out[f"refused_{k}"] = v
        return out


# -- may close() of an fd wait on somebody else? --------------------------------------------

# close() of a file on one of these cannot wait on anybody: shmem and ramfs keep their pages in memory.
SAFE_FSTYPES = frozenset(("tmpfs", "ramfs", "hugetlbfs"))
# names the kernel gives fds that no filesystem path names (pipefs, sockfs, anon_inodefs): a real path
# always starts with "/", so a FUSE file cannot make its link look like one of these
_PIPE, _SOCKET, _ANON = "pipe:", "socket:", "anon_inode:"
MOUNTS_MAX = 16384  # mount table entries kept; beyond that a mount is unknown, so "may block"
UNKNOWN = "?"  # the closer's queue key for fds whose filesystem could not be told


class FdClassifier:
    """Whether close() of an fd may block, decided without any call into the fd's filesystem.

    A FUSE file's close() waits for the server's FLUSH reply, and fstat,
    statx or fstatfs on it may themselves send GETATTR/STATFS to that server
    (or fail with EACCES on a mount without allow_other). So this looks only
    at what the kernel answers from its own tables:

    - ``readlinkat(/proc/self/fd, N)``: pipes, sockets and anonymous inodes
      (eventfd, epoll, pidfd...) have kernel-made names that no path can
      take; unix sockets (SO_DOMAIN) are safe, other sockets may linger.
    - ``fcntl(F_GET_SEALS)``: answered by the memfd code for shmem files only
      (memfds, whose link reads ``/memfd:NAME (deleted)``, and tmpfs files).
    - ``/proc/self/fdinfo/N`` ``mnt_id`` looked up in ``/proc/self/mountinfo``
      (procfs generates both from kernel tables): tmpfs/ramfs/hugetlbfs are
      safe; fuse*, devices, disk and network filesystems and anything not
      found may block.

    Whatever cannot be read counts as "may block". The answer also names the
    filesystem (its mnt_id), so the closer can keep one stuck mount from
    holding up closes on others. The mount table is cached and re-read only
    when an mnt_id is missing and the kernel reports (poll on mountinfo) that
    the table changed since, so a missing mnt_id costs one re-read at most.
    The /proc directories are opened once and kept open (before the sandbox:
    see ``broker.launch.sandbox.apply_landlock``, which grants reading fdinfo).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._pid = 0
        self._fd_dir = self._fdinfo_dir = self._mountinfo = -1
        self.mounts: dict[int, str] = {}  # mnt_id -> fstype

    def prepare(self) -> None:
        """Open /proc/self/{fd,fdinfo,mountinfo} (again after a fork); idempotent."""
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
            self._fd_dir = self._fdinfo_dir = self._mountinfo = -1
            try:
                self._fd_dir = os.open("/proc/self/fd", flags)
                self._fdinfo_dir = os.open("/proc/self/fdinfo", flags)
                self._mountinfo = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return  # without /proc every fd but a shmem file "may block"
            self._read_mounts()

    @property
    def fdinfo_dir(self) -> int:
        return self._fdinfo_dir

    def _read_mounts(self) -> None:
        """Re-read the mount table (caller holds the lock); the poll state is consumed first."""
        fd = self._mountinfo
        if fd < 0:
            return
        mounts = {}
        chunks, size = [], 0
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            while size < MOUNTS_MAX * 256:  # bounded: the rest of a huge table stays unknown ("may block")
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        except OSError:
            return
        data = b"".join(chunks)
        for line in data.split(b"\n")[:MOUNTS_MAX]:
            # "36 35 98:0 /root /mnt opts [optional fields] - fstype source superopts"
            head, sep, tail = line.partition(b" - ")
            if sep:
                try:
                    mounts[int(head.split(b" ", 1)[0])] = tail.split(b" ", 1)[0].decode("ascii", "replace")
                except ValueError:
                    continue
        self.mounts = mounts

    def _mounts_changed(self) -> bool:
        p = select.poll()
        p.register(self._mountinfo, select.POLLPRI)
        return bool(p.poll(0))

    def fstype(self, mnt_id: int) -> str | None:
        """The filesystem type of a mount of ours; None if not in the mount table."""
        t = self.mounts.get(mnt_id)
        if t is None and self._mountinfo >= 0:
            with self._lock:
                if self._mounts_changed():
                    self._read_mounts()
                t = self.mounts.get(mnt_id)
        return t

    def mnt_id(self, fd: int) -> int | None:
        """The mount of ``fd`` as /proc/self/fdinfo tells it; None if that cannot be read."""
        if self._pid != os.getpid():
            self.prepare()
        try:
            f = os.open(str(fd), os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._fdinfo_dir)
        except OSError:
            return None
        try:
            info = os.read(f, 4096)
        except OSError:
            return None
        finally:
            os.close(f)
        i = info.find(b"mnt_id:")
        if i < 0:
            return None
        try:
            return int(info[i + 7 : info.index(b"\n", i)])
        except ValueError:
            return None

    def close_key(self, fd: int):
        """None when close(fd) cannot block (close it now); otherwise a key naming what it may wait on:
        the mnt_id of its filesystem, "socket" (a lingering network socket) or UNKNOWN."""
        if get_seals(fd) is not None:
            return None  # shmem: a memfd (the common payload) or a tmpfs file; answered by the memfd code
        if self._pid != os.getpid():
            self.prepare()
        try:
            link = os.readlink(str(fd), dir_fd=self._fd_dir) if self._fd_dir >= 0 else ""
        except FileNotFoundError:
            return None  # not an open fd: close() returns EBADF at once
        except OSError:
            link = ""
        if link.startswith((_PIPE, _ANON)):
            return None
        if link.startswith(_SOCKET):
            try:
                sock = socket.socket(fileno=os.dup(fd))
            except OSError:
                return "socket"
            try:
                return None if sock.getsockopt(socket.SOL_SOCKET, _SO_DOMAIN) == socket.AF_UNIX else "socket"
            except OSError:
                return "socket"
            finally:
                sock.close()
        if not link.startswith("/"):
            return UNKNOWN  # a name no path has and we do not know (e.g. a newer kernel's pidfs)
        mnt = self.mnt_id(fd)
        if mnt is None:
            return UNKNOWN
        return None if self.fstype(mnt) in SAFE_FSTYPES else mnt


classifier = FdClassifier()  # process-wide: its /proc fds are opened once, before the sandbox


def close_may_block(fd: int) -> bool:
    """Whether close() of this fd may wait on somebody else, so the broker must not do it on its loop.

    A file on a FUSE mount sends FUSE_FLUSH on every close() and waits for the
    answer: a client serving its own mount can pass such a file and never
    answer, stalling the whole bus (refusing the message does not help, the
    broker already holds its copy). Block and character devices may sync or
    drain on release (a tty waits up to 30 s), and a TCP socket with SO_LINGER
    waits for its unsent data. See :class:`FdClassifier`: what it cannot
    prove harmless may block.
    """
    return classifier.close_key(fd) is not None
