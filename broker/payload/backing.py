"""Where payload-fs contents live: unlinked files in a directory only the broker can use.

A payload of a GiB must not become a GiB of broker heap. The store keeps each
payload in an O_TMPFILE made in this directory: a file no path names, that
only the broker's fd reaches, and that the kernel frees when the broker closes
it or dies (nothing to clean up after a crash but the empty directory). The
directory is usable by the broker's user alone (0700 and its own for a session bus; for the system
bus root's, group the bus user's, 0770: the launcher holds no CAP_CHOWN), on the bus's own storage
(the runtime directory of the system bus, $XDG_RUNTIME_DIR or the temporary
directory for a session bus). Its bytes are charged to the sender's quota by
the store, whatever the filesystem underneath.
"""

import os
import tempfile

# The name the launcher gives the broker's store in the bus's runtime directory: fixed, because the SELinux
# policy types the directory by name (a named type transition to sealbus_store_t, policy/sealbus.te).
LAUNCHER_STORE_NAME = "sealbus-store-broker"


def make_store_dir(parent: str | None = None, gid: int = -1, name: str | None = None) -> tuple[str, int]:
    """A fresh private directory under parent (default: the temporary directory): (path, open dir fd).

    gid: the broker's user's group when a launcher (root) makes it for the broker: the directory is made
    with the bus user's group as the effective one (CAP_SETGID, which the launcher keeps to start the
    broker) and opened to that group, so no chown (CAP_CHOWN) is needed.
    name: a fixed name instead of a random one, only in a parent nobody else may write (the launcher's
    root-owned runtime directory): an empty directory of that name (left by a launcher that was killed)
    is replaced, anything else there is an error.
    """
    egid = os.getegid()
    switch = gid >= 0 and gid != egid
    if switch:
        os.setegid(gid)  # the new directory's group; the launcher is single-threaded here
    try:
        path = tempfile.mkdtemp(prefix="sealbus-store-", dir=parent) if name is None else _fresh_dir(parent, name)
        try:
            # by fd, never following a link: the parent (a runtime dir) may be writable by the bus user
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except BaseException:
            os.rmdir(path)
            raise
        try:
            if switch:  # still as that group: no CAP_FSETID check for a group the launcher is not in
                os.fchmod(fd, 0o770)  # owner root, group the bus user's: only the broker may use it
        except BaseException:
            os.close(fd)
            os.rmdir(path)
            raise
    finally:
        if switch:
            os.setegid(egid)
    return path, fd


def _fresh_dir(parent: str | None, name: str) -> str:
    """parent/name made anew, 0700 (rmdir of a leftover fails unless it is an empty directory)."""
    path = os.path.join(parent or tempfile.gettempdir(), name)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        os.rmdir(path)
        os.mkdir(path, 0o700)
    return path


def session_store_parent() -> str | None:
    """$XDG_RUNTIME_DIR when it is usable (the user's own tmpfs), else None (the temporary directory)."""
    rt = os.environ.get("XDG_RUNTIME_DIR")
    return rt if rt and os.path.isdir(rt) and os.access(rt, os.W_OK | os.X_OK) else None


def remove_store_dir(path: str, fd: int | None = None) -> None:
    """Close the directory fd and remove the (empty: its files were never named) directory."""
    if fd is not None:
        os.close(fd)
    try:
        os.rmdir(path)
    except OSError:
        pass  # already gone, or not ours to remove any more
