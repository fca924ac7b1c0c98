"""FUSE requests translated into PayloadStore calls (pyfuse3.Operations).

Every rule lives in the store; this layer only knows which caller (the
RequestContext uid, which the kernel fills in, never the client) asks for
what, and turns StoreError into the errno the caller sees. Write, read and
release carry no RequestContext in pyfuse3, so ownership is checked when a
file is opened or created and the file handle carries it from there.

Nothing here touches the mount itself: a FUSE server that makes a syscall on
its own mount from the loop thread deadlocks.
"""

import errno
import functools
import inspect
import logging
import os

import pyfuse3

from .store import (
    COOKIE_XATTR,
    ROOT_INO,
    SEAL_XATTR,
    SNAP_INO,
    TMP_INO,
    Inode,
    PayloadStore,
    StoreError,
)

log = logging.getLogger("sealbus.payload.fs")

_DIR_TIMEOUT = 60.0
_SNAPSHOT_ATTR_TIMEOUT = 3600.0  # immutable
# tmp files: every path walk asks us again, so a name the creator looked up is
# never served to another uid from the kernel's dentry cache.
_FILE_TIMEOUT = 0.0


def _fail(e: StoreError):
    return pyfuse3.FUSEError(e.errno)


class PayloadOperations(pyfuse3.Operations):
    def __init__(self, store: PayloadStore):
        super().__init__()
        self.store = store
        self._handles: dict[int, Inode] = {}
        self._dir_handles: dict[int, tuple[int, int]] = {}  # fh -> (dir inode, uid of the opener)
        self._next_fh = 1

    # -- helpers ----------------------------------------------------------

    def _attrs(self, node: Inode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_size = node.size
        a.st_blksize = 4096
        a.st_blocks = (node.size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.ctime_ns
        if node.ino == SNAP_INO:
            a.entry_timeout, a.attr_timeout = 0.0, _DIR_TIMEOUT  # re-looked-up per caller: hidden from clients
        elif node.kind == "dir":
            a.entry_timeout = a.attr_timeout = _DIR_TIMEOUT
        elif node.kind == "snapshot":
            a.entry_timeout, a.attr_timeout = 0.0, _SNAPSHOT_ATTR_TIMEOUT
        else:
            a.entry_timeout = a.attr_timeout = _FILE_TIMEOUT
        return a

    def _entry(self, node: Inode) -> pyfuse3.EntryAttributes:
        """An entry reply: the kernel now holds one more reference (until forget)."""
        node.lookups += 1
        return self._attrs(node)

    def _new_fh(self, node: Inode) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = node
        self.store.opened(node)
        return fh

    def _node(self, inode: int) -> Inode:
        try:
            return self.store.get(inode)
        except StoreError as e:
            raise _fail(e)

    # -- names ------------------------------------------------------------

    async def lookup(self, parent_inode, name, ctx):
        if name == b".":
            return self._entry(self._node(parent_inode))
        if name == b"..":
            return self._entry(self._node(ROOT_INO))
        try:
            return self._entry(self.store.lookup(parent_inode, name, ctx.uid))
        except StoreError as e:
            raise _fail(e)

    async def forget(self, inode_list):
        for ino, n in inode_list:
            self.store.forget(ino, n)

    async def getattr(self, inode, ctx):
        node = self._node(inode)
        if node.parent == TMP_INO and node.kind == "file" and ctx.uid != node.uid:
            raise pyfuse3.FUSEError(errno.EACCES)
        return self._attrs(node)

    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self._node(inode)
        if node.kind != "file" or ctx.uid != node.uid:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)  # a payload stays 0600 and its creator's
        if fields.update_size:
            try:
                self.store.truncate(node, attr.st_size)
            except StoreError as e:
                raise _fail(e)
        elif node.sealed and (fields.update_atime or fields.update_mtime):
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._attrs(node)

    async def create(self, parent_inode, name, mode, flags, ctx):
        try:
            node = self.store.create(parent_inode, name, ctx.uid, ctx.gid)
        except StoreError as e:
            raise _fail(e)
        return pyfuse3.FileInfo(fh=self._new_fh(node)), self._entry(node)

    async def unlink(self, parent_inode, name, ctx):
        try:
            self.store.unlink(parent_inode, name, ctx.uid)
        except StoreError as e:
            raise _fail(e)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mkdir(self, parent_inode, name, mode, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def symlink(self, parent_inode, name, target, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rmdir(self, parent_inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    # -- directories --------------------------------------------------------

    async def opendir(self, inode, ctx):
        node = self._node(inode)
        if node.kind != "dir":
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._next_fh
        self._next_fh += 1
        self._dir_handles[fh] = (inode, ctx.uid)
        return fh

    async def readdir(self, fh, start_id, token):
        ino, uid = self._dir_handles[fh]
        try:
            entries = self.store.list_dir(ino, uid)
        except StoreError as e:
            raise _fail(e)
        for i, (name, node) in enumerate(entries[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self._attrs(node), i):
                break

    async def releasedir(self, fh):
        self._dir_handles.pop(fh, None)

    # -- files --------------------------------------------------------------

    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        acc = flags & os.O_ACCMODE
        try:
            self.store.check_open(node, ctx.uid, acc != os.O_RDONLY, bool(flags & os.O_TRUNC))
        except StoreError as e:
            raise _fail(e)
        return pyfuse3.FileInfo(fh=self._new_fh(node), keep_cache=node.kind == "snapshot")

    async def read(self, fh, off, size):
        try:
            return self.store.read(self._handles[fh], off, size)
        except StoreError as e:
            raise _fail(e)

    async def write(self, fh, off, buf):
        try:
            return self.store.write(self._handles[fh], off, buf)
        except StoreError as e:
            raise _fail(e)

    # flush is deliberately not implemented: the kernel then stops sending
    # FLUSH on close() (no_flush), so the broker may close payload fds, even
    # from its loop thread, without waiting for itself.

    async def fsync(self, fh, datasync):
        pass

    async def release(self, fh):
        node = self._handles.pop(fh, None)
        if node is not None:
            self.store.released(node)

    # -- the seal and the cookie --------------------------------------------

    async def setxattr(self, inode, name, value, ctx):
        node = self._node(inode)
        if node.sealed:
            raise pyfuse3.FUSEError(errno.EPERM)
        if name != SEAL_XATTR:
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        try:
            self.store.seal(node, ctx.uid)
        except StoreError as e:
            raise _fail(e)

    async def getxattr(self, inode, name, ctx):
        node = self._node(inode)
        if name != COOKIE_XATTR:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        try:
            return self.store.cookie_of(node, ctx.uid)
        except StoreError as e:
            raise _fail(e)

    async def listxattr(self, inode, ctx):
        node = self._node(inode)
        return [COOKIE_XATTR] if node.cookie is not None and ctx.uid == node.uid else []

    async def removexattr(self, inode, name, ctx):
        node = self._node(inode)
        raise pyfuse3.FUSEError(errno.EPERM if node.sealed else pyfuse3.ENOATTR)

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        lim = self.store.limits
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = lim.total_bytes // 4096
        s.f_bfree = s.f_bavail = max(0, lim.total_bytes - self.store.total_bytes) // 4096
        s.f_files = lim.total_files
        s.f_ffree = s.f_favail = max(0, lim.total_files - self.store.total_files)
        s.f_namemax = 255
        return s


def _guarded(fn):
    """A bug in one request answers EIO to that request; it must never end pyfuse3.main() and the bus with it."""

    @functools.wraps(fn)
    async def handler(*args, **kw):
        try:
            return await fn(*args, **kw)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("payload fs: %s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return handler


for _name, _fn in list(vars(PayloadOperations).items()):
    if inspect.iscoroutinefunction(_fn):
        setattr(PayloadOperations, _name, _guarded(_fn))


__all__ = ["SNAP_INO", "PayloadOperations"]
