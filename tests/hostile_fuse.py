"""A hostile FUSE server for tests: one file ``f`` whose FLUSH is never answered.

Run as ``python hostile_fuse.py MOUNTPOINT [--private]``; prints ``ready`` once
mounted. Any process that close()s an fd of ``MOUNTPOINT/f`` hangs until this
server dies (the kernel then aborts the connection and the close returns).
``--private`` mounts without allow_other, as a user's plain fusermount3 mount
is: other users, root included, get EACCES from stat on it (but their close()
of an fd they were passed still waits for FLUSH).
"""

import errno
import stat
import sys

import pyfuse3
import trio


class NeverFlush(pyfuse3.Operations):
    async def getattr(self, inode, ctx=None):
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_nlink = stat.S_IFDIR | 0o755, 2
        else:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o644, 1, 4
        a.attr_timeout = a.entry_timeout = 300
        return a

    async def lookup(self, parent_inode, name, ctx=None):
        if name != b"f":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(2)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh, off, size):
        return b"data"[off : off + size]

    async def flush(self, fh):
        await trio.sleep_forever()


if __name__ == "__main__":
    opts = {"fsname=sealbus-test-hostile"} | (set() if "--private" in sys.argv else {"allow_other"})
    pyfuse3.init(NeverFlush(), sys.argv[1], opts)
    print("ready", flush=True)
    trio.run(pyfuse3.main)


def mount(mnt, user=None):
    """Context manager for tests: serve the hostile fs at ``mnt`` in a child process; kill it on exit.

    With ``user`` (a pwd entry) the server runs as that user and mounts through fusermount3 without
    allow_other (``mnt`` is chowned to the user; its parents must let the user reach it)."""
    import contextlib
    import os
    import subprocess

    def demote():
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    @contextlib.contextmanager
    def cm():
        argv = [sys.executable, os.path.abspath(__file__), str(mnt)]
        if user is not None:
            os.chown(mnt, user.pw_uid, user.pw_gid)
            argv.append("--private")
        srv = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, preexec_fn=demote if user else None)
        try:
            assert srv.stdout.readline().strip() == "ready"
            yield mnt
        finally:
            srv.kill()  # aborts the FUSE connection: every close() stuck on it returns
            srv.wait()
            subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)

    return cm()
