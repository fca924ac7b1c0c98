"""The payload filesystem's state, without any I/O on the mount.

Everything a FUSE request or a Claim can change lives here, so the rules
(ownership, sealing, single-use cookies, quotas, expiry) are plain method
calls that tests drive directly; ``fusefs`` only translates FUSE requests and
``claim`` only adds the one syscall the broker must make on its own mount.

Contents are kept, when a broker-private directory fd is given (what the bus
does, see ``backing``), in an O_TMPFILE there: an unlinked file that no path
names and that vanishes with the broker, so large payloads stay out of the
broker's heap; without one (unit tests), in broker memory (a bytearray,
frozen to ``bytes`` when sealed).
Sealed contents are shared, never copied, between a sealed file and the
snapshots claimed from it: the bytes a receiver sees are those the broker
held at sealing time, whatever the sender's dirty pages do afterwards.
"""

import errno
import heapq
import os
import secrets
import stat
import time
from collections import OrderedDict
from dataclasses import dataclass, field

ROOT_INO = 1
TMP_INO = 2
SNAP_INO = 3
TMP_NAME = b"tmp"
# Not listed by readdir; lookup answers only the broker's own uid.
SNAP_NAME = b".sealbus-snapshots"

SEAL_XATTR = b"user.sealbus.seal"
COOKIE_XATTR = b"user.sealbus.cookie"

E_COOKIE_UNKNOWN = "org.sealbus.Error.CookieUnknown"
E_COOKIE_EXPIRED = "org.sealbus.Error.CookieExpired"
E_COOKIE_FOREIGN = "org.sealbus.Error.CookieForeign"
E_COOKIE_USED = "org.sealbus.Error.CookieUsed"
E_CLAIM_FAILED = "org.sealbus.Error.ClaimFailed"

_TOMBSTONES = 4096  # remembered used/expired cookies, so a late claim gets the precise error


class StoreError(OSError):
    """A request the store refuses; ``errno`` is what the FUSE caller sees."""

    def __init__(self, err: int, why: str = ""):
        super().__init__(err, why or os.strerror(err))


class ClaimError(Exception):
    """A refused Claim, carrying the exact D-Bus error name to reply with."""

    def __init__(self, error_name: str, message: str):
        super().__init__(message)
        self.error_name = error_name
        self.message = message


@dataclass
class Limits:
    bytes_per_user: int = 256 * 1024 * 1024
    files_per_user: int = 1024
    total_bytes: int = 1024 * 1024 * 1024
    total_files: int = 16384
    timeout_s: float = 30.0

    @classmethod
    def from_settings(cls, settings) -> "Limits":
        """From BusSettings (payload_timeout_ms, payload_max_bytes_per_user from <payload_fs>)."""
        per_user = settings.payload_max_bytes_per_user
        return cls(bytes_per_user=per_user, total_bytes=max(per_user * 4, cls.total_bytes),
                   timeout_s=settings.payload_timeout_ms / 1000)  # fmt: skip


def _pwrite_all(fd: int, data: bytes, off: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, off)
        view, off = view[n:], off + n


class Contents:
    """Bytes of one payload, charged to one uid until the last inode lets go."""

    def __init__(self, store: "PayloadStore", uid: int):
        self.store = store
        self.uid = uid
        self.size = 0
        self.refs = 1
        self.frozen = False
        self._mem: bytearray | bytes | None = bytearray()
        self._fd = -1
        if store.backing_dir_fd is not None:
            self._fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=store.backing_dir_fd)
            self._mem = None

    def read(self, off: int, size: int) -> bytes:
        if off >= self.size:
            return b""
        size = min(size, self.size - off)
        if self._fd >= 0:
            return os.pread(self._fd, size, off)
        return bytes(self._mem[off : off + size])

    def write(self, off: int, data: bytes) -> None:
        end = off + len(data)
        grow = max(0, end - self.size)
        if grow:
            self.store._charge(self.uid, grow)
        if self._fd >= 0:
            try:
                _pwrite_all(self._fd, data, off)
            except OSError as e:  # the backing filesystem is full (or failing): refuse, and take the charge back
                self.store._uncharge(self.uid, grow)
                os.ftruncate(self._fd, self.size)
                raise StoreError(errno.ENOSPC, f"payload backing store: {e.strerror}") from None
        else:
            if off > len(self._mem):
                self._mem.extend(bytes(off - len(self._mem)))
            self._mem[off:end] = data
        self.size = max(self.size, end)

    def truncate(self, size: int) -> None:
        if size > self.size:
            self.store._charge(self.uid, size - self.size)
        else:
            self.store._uncharge(self.uid, self.size - size)
        if self._fd >= 0:
            os.ftruncate(self._fd, size)
        elif size < len(self._mem):
            del self._mem[size:]
        else:
            self._mem.extend(bytes(size - len(self._mem)))
        self.size = size

    def freeze(self) -> None:
        self.frozen = True
        if self._mem is not None:
            self._mem = bytes(self._mem)

    def unref(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            self.store._uncharge(self.uid, self.size)
            self.size = 0
            self._mem = b""
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


@dataclass
class Inode:
    ino: int
    kind: str  # dir | file | snapshot
    uid: int
    gid: int
    mode: int
    parent: int = 0
    name: bytes = b""
    nlink: int = 1
    lookups: int = 0  # kernel references (lookup/create minus forget)
    opens: int = 0
    contents: Contents | None = None
    sealed: bool = False
    cookie: str | None = None
    expired: bool = False  # contents freed by expiry; the inode lingers only for the kernel's references
    counted: bool = False  # counts against its uid's file quota
    generation: int = 0  # bumps invalidate queued expiry deadlines
    ctime_ns: int = field(default_factory=time.time_ns)

    @property
    def size(self) -> int:
        return self.contents.size if self.contents is not None else 0


class PayloadStore:
    def __init__(self, *, broker_uid: int | None = None, broker_gid: int | None = None,
                 limits: Limits | None = None, backing_dir_fd: int | None = None, clock=time.monotonic):  # fmt: skip
        self.broker_uid = os.getuid() if broker_uid is None else broker_uid
        self.broker_gid = os.getgid() if broker_gid is None else broker_gid
        self.limits = limits or Limits()
        self.backing_dir_fd = backing_dir_fd
        self.clock = clock
        self.mountpoint: str | None = None  # where the broker itself reaches the mount (set when served)
        self.st_dev: int | None = None  # the mount's device number, learnt from the first snapshot
        self.inodes: dict[int, Inode] = {}
        self.dirs: dict[int, dict[bytes, int]] = {ROOT_INO: {}, TMP_INO: {}, SNAP_INO: {}}
        self.cookies: dict[str, int] = {}  # live cookie -> sealed inode
        self.tombstones: OrderedDict[str, tuple[str, int]] = OrderedDict()  # cookie -> (used|expired, uid)
        self.bytes_by_uid: dict[int, int] = {}
        self.files_by_uid: dict[int, int] = {}
        self.total_bytes = 0
        self.total_files = 0
        self._deadlines: list[tuple[float, int, int]] = []
        self._next_ino = SNAP_INO + 1
        bu, bg = self.broker_uid, self.broker_gid
        # tmp/: sticky and writable by all, searchable but not listable by others (1733).
        self._add(Inode(ROOT_INO, "dir", bu, bg, stat.S_IFDIR | 0o755, nlink=3))
        self._add(Inode(TMP_INO, "dir", bu, bg, stat.S_IFDIR | stat.S_ISVTX | 0o733, ROOT_INO, TMP_NAME, nlink=2))
        self._add(Inode(SNAP_INO, "dir", bu, bg, stat.S_IFDIR | 0o700, ROOT_INO, SNAP_NAME, nlink=2))
        self.dirs[ROOT_INO] = {TMP_NAME: TMP_INO, SNAP_NAME: SNAP_INO}

    # -- bookkeeping -------------------------------------------------------

    def _add(self, node: Inode) -> Inode:
        self.inodes[node.ino] = node
        return node

    def _charge(self, uid: int, n: int) -> None:
        if self.bytes_by_uid.get(uid, 0) + n > self.limits.bytes_per_user:
            raise StoreError(errno.EDQUOT, f"uid {uid} payload bytes quota exceeded")
        if self.total_bytes + n > self.limits.total_bytes:
            raise StoreError(errno.ENOSPC, "payload store full")
        self.bytes_by_uid[uid] = self.bytes_by_uid.get(uid, 0) + n
        self.total_bytes += n

    def _uncharge(self, uid: int, n: int) -> None:
        self.bytes_by_uid[uid] = self.bytes_by_uid.get(uid, 0) - n
        self.total_bytes -= n
        if not self.bytes_by_uid[uid]:
            del self.bytes_by_uid[uid]

    def _count_file(self, uid: int) -> None:
        if self.files_by_uid.get(uid, 0) >= self.limits.files_per_user:
            raise StoreError(errno.EDQUOT, f"uid {uid} payload files quota exceeded")
        if self.total_files >= self.limits.total_files:
            raise StoreError(errno.ENOSPC, "payload store full")
        self.files_by_uid[uid] = self.files_by_uid.get(uid, 0) + 1
        self.total_files += 1

    def _uncount_file(self, node: Inode) -> None:
        if node.counted:
            node.counted = False
            self.files_by_uid[node.uid] -= 1
            if not self.files_by_uid[node.uid]:
                del self.files_by_uid[node.uid]
            self.total_files -= 1

    def _release_contents(self, node: Inode) -> None:
        if node.contents is not None:
            node.contents.unref()
            node.contents = None
        self._uncount_file(node)

    def _schedule(self, node: Inode) -> None:
        node.generation += 1
        heapq.heappush(self._deadlines, (self.clock() + self.limits.timeout_s, node.ino, node.generation))

    def _maybe_free(self, node: Inode) -> None:
        """Free the bytes of a file nobody can reach any more; forget the inode once the kernel has."""
        if node.kind == "dir" or node.nlink or node.opens:
            return
        if node.kind == "file" and node.sealed and node.cookie is not None:
            return  # closing before claiming is fine: it waits for its claim or its expiry
        self._release_contents(node)
        if node.lookups <= 0:
            self.inodes.pop(node.ino, None)

    def _tombstone(self, cookie: str, state: str, uid: int) -> None:
        self.tombstones[cookie] = (state, uid)
        while len(self.tombstones) > _TOMBSTONES:
            self.tombstones.popitem(last=False)

    # -- what FUSE requests do ----------------------------------------------

    def get(self, ino: int) -> Inode:
        node = self.inodes.get(ino)
        if node is None:
            raise StoreError(errno.ENOENT)
        return node

    def lookup(self, parent: int, name: bytes, uid: int) -> Inode:
        """Names are visible only to whom they belong: tmp files to their creator, snapshots to the broker."""
        ino = self.dirs.get(parent, {}).get(name)
        if ino is None:
            raise StoreError(errno.ENOENT)
        node = self.inodes[ino]
        if parent == ROOT_INO and ino == SNAP_INO and uid != self.broker_uid:
            raise StoreError(errno.ENOENT)
        if parent == TMP_INO and uid != node.uid:
            raise StoreError(errno.ENOENT)
        if parent == SNAP_INO and uid != self.broker_uid:
            raise StoreError(errno.ENOENT)
        return node

    def list_dir(self, ino: int, uid: int) -> list[tuple[bytes, Inode]]:
        if ino == ROOT_INO:
            return [(TMP_NAME, self.inodes[TMP_INO])]
        if ino == TMP_INO:
            return [(n, self.inodes[i]) for n, i in self.dirs[TMP_INO].items() if self.inodes[i].uid == uid]
        if ino == SNAP_INO and uid == self.broker_uid:
            return [(n, self.inodes[i]) for n, i in self.dirs[SNAP_INO].items()]
        raise StoreError(errno.EACCES)

    def create(self, parent: int, name: bytes, uid: int, gid: int) -> Inode:
        if parent != TMP_INO:
            raise StoreError(errno.EACCES, "files can be created only in tmp/")
        if not name or b"/" in name or name in (b".", b"..") or len(name) > 255:
            raise StoreError(errno.EINVAL)
        if name in self.dirs[TMP_INO]:
            raise StoreError(errno.EEXIST)
        self._count_file(uid)
        try:
            contents = Contents(self, uid)
        except OSError:
            self._uncount_file(Inode(0, "file", uid, gid, 0, counted=True))
            raise StoreError(errno.ENOSPC, "backing store unavailable") from None
        node = self._add(Inode(self._next_ino, "file", uid, gid, stat.S_IFREG | 0o600, TMP_INO, name,
                               contents=contents, counted=True))  # fmt: skip
        self._next_ino += 1
        self.dirs[TMP_INO][name] = node.ino
        return node

    def unlink(self, parent: int, name: bytes, uid: int) -> None:
        node = self.lookup(parent, name, uid)
        if node.kind == "dir":
            raise StoreError(errno.EPERM)
        del self.dirs[parent][name]
        node.nlink = 0
        node.name = b""
        self._maybe_free(node)

    def check_open(self, node: Inode, uid: int, writable: bool, truncate: bool) -> None:
        if node.kind == "dir":
            raise StoreError(errno.EISDIR)
        if node.kind == "snapshot":
            if uid != self.broker_uid or writable or truncate:
                raise StoreError(errno.EACCES)
            return
        if uid != node.uid:
            raise StoreError(errno.EACCES)
        if node.expired:
            raise StoreError(errno.ESTALE)
        if node.sealed and (writable or truncate):
            raise StoreError(errno.EPERM, "payload is sealed")

    def opened(self, node: Inode) -> None:
        node.opens += 1

    def released(self, node: Inode) -> None:
        """The last close of a still named file that waits for no claim (never sealed, or claimed
        already) starts its expiry clock."""
        node.opens -= 1
        if node.opens == 0 and node.kind == "file" and node.nlink and node.cookie is None:
            self._schedule(node)
        self._maybe_free(node)

    def forget(self, ino: int, n: int) -> None:
        node = self.inodes.get(ino)
        if node is not None and node.kind != "dir":
            node.lookups -= n
            self._maybe_free(node)

    def read(self, node: Inode, off: int, size: int) -> bytes:
        if node.contents is None:
            raise StoreError(errno.ESTALE if node.expired else errno.EIO)
        return node.contents.read(off, size)

    def write(self, node: Inode, off: int, data: bytes) -> int:
        if node.kind != "file" or node.sealed:
            raise StoreError(errno.EPERM, "payload is sealed")
        if node.contents is None:
            raise StoreError(errno.ESTALE)
        node.contents.write(off, data)
        return len(data)

    def truncate(self, node: Inode, size: int) -> None:
        if node.kind != "file" or node.sealed:
            raise StoreError(errno.EPERM, "payload is sealed")
        if node.contents is None:
            raise StoreError(errno.ESTALE)
        node.contents.truncate(size)

    def seal(self, node: Inode, uid: int) -> str:
        """Freeze the contents and mint the single-use cookie; the expiry clock starts now."""
        if node.kind != "file" or node.sealed or uid != node.uid:
            raise StoreError(errno.EPERM)
        if node.contents is None:
            raise StoreError(errno.ESTALE)
        node.contents.freeze()
        node.sealed = True
        node.cookie = secrets.token_hex(16)
        self.cookies[node.cookie] = node.ino
        self._schedule(node)
        return node.cookie

    def cookie_of(self, node: Inode, uid: int) -> bytes:
        if node.kind != "file" or uid != node.uid:
            raise StoreError(errno.EACCES)
        if node.cookie is None:
            raise StoreError(errno.ENODATA)
        return node.cookie.encode()

    # -- claims and snapshots -----------------------------------------------

    def claim(self, uid: int, cookie: str) -> Inode:
        """Consume the cookie and make the snapshot inode (named under the hidden directory)."""
        ino = self.cookies.get(cookie) if isinstance(cookie, str) else None
        if ino is None:
            state = self.tombstones.get(cookie) if isinstance(cookie, str) else None
            if state is not None and state[1] == uid:
                if state[0] == "used":
                    raise ClaimError(E_COOKIE_USED, "this cookie has already been claimed")
                raise ClaimError(E_COOKIE_EXPIRED, "the payload expired before it was claimed")
            if state is not None:
                raise ClaimError(E_COOKIE_FOREIGN, "this cookie belongs to another user")
            raise ClaimError(E_COOKIE_UNKNOWN, "no sealed payload has this cookie")
        orig = self.inodes[ino]
        if orig.uid != uid:
            # Not consumed: a foreign claim must not let another user burn the creator's cookie.
            raise ClaimError(E_COOKIE_FOREIGN, "this cookie belongs to another user")
        del self.cookies[cookie]
        self._tombstone(cookie, "used", uid)
        orig.contents.refs += 1
        snap = self._snapshot_entry(orig.contents)
        # The original keeps the frozen bytes only while its creator still holds it: open, or named
        # (then, once closed, it expires as a never-sealed file does).
        orig.generation += 1
        orig.cookie = None
        if orig.nlink and not orig.opens:
            self._schedule(orig)
        self._maybe_free(orig)
        return snap

    def _snapshot_entry(self, contents: Contents) -> Inode:
        name = secrets.token_hex(16).encode()
        snap = self._add(Inode(self._next_ino, "snapshot", self.broker_uid, self.broker_gid, stat.S_IFREG | 0o400,
                               SNAP_INO, name, contents=contents, sealed=True))  # fmt: skip
        self._next_ino += 1
        self.dirs[SNAP_INO][name] = snap.ino
        return snap

    def probe_snapshot(self) -> Inode:
        """An empty snapshot the broker opens and closes once at start (see io.fuse: FLUSH)."""
        contents = Contents(self, self.broker_uid)
        contents.freeze()
        return self._snapshot_entry(contents)

    def drop_snapshot(self, snap: Inode) -> None:
        """Undo a snapshot whose open failed."""
        if snap.name and self.dirs[SNAP_INO].get(snap.name) == snap.ino:
            del self.dirs[SNAP_INO][snap.name]
        snap.nlink = 0
        self._maybe_free(snap)

    def is_snapshot(self, st_dev: int, st_ino: int) -> bool:
        """Whether (st_dev, st_ino) is a read-only snapshot this store handed out (for the bus's fd vetting)."""
        if self.st_dev is None or st_dev != self.st_dev:
            return False
        node = self.inodes.get(st_ino)
        return node is not None and node.kind == "snapshot"

    # -- expiry ---------------------------------------------------------------

    def next_deadline(self) -> float | None:
        return self._deadlines[0][0] if self._deadlines else None

    def expire(self, now: float | None = None) -> int:
        """Free what has waited too long: unclaimed sealed files, and closed files still named that wait for
        no claim (never sealed, or claimed already). Returns the count."""
        now = self.clock() if now is None else now
        freed = 0
        while self._deadlines and self._deadlines[0][0] <= now:
            _, ino, gen = heapq.heappop(self._deadlines)
            node = self.inodes.get(ino)
            if node is None or node.generation != gen or node.kind != "file" or node.expired:
                continue
            if node.sealed and node.cookie is not None:
                del self.cookies[node.cookie]
                self._tombstone(node.cookie, "expired", node.uid)
                node.cookie = None
            elif node.opens:
                continue  # open again since: its last close schedules it anew
            if node.nlink and self.dirs[node.parent].get(node.name) == node.ino:
                del self.dirs[node.parent][node.name]
                node.nlink = 0
            node.expired = True
            self._release_contents(node)
            self._maybe_free(node)
            freed += 1
        return freed

    def usage(self, uid: int) -> tuple[int, int]:
        """(bytes, files) charged to uid."""
        return self.bytes_by_uid.get(uid, 0), self.files_by_uid.get(uid, 0)
