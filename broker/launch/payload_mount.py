"""The launcher's side of the payload filesystem: open /dev/fuse and mount(2) it.

Root mounts, the sandboxed broker serves (through the inherited /dev/fuse fd):
the broker never needs CAP_SYS_ADMIN, and the mount options that make the fs
safe for other users are chosen here, where privilege is. ``context=`` labels
the whole mount ``sealbus_fs_t`` when SELinux is enabled, so confinement does
not depend on where it is mounted.
"""

import ctypes
import errno
import os

from ..payload.mounts import sealbus_mounts

MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MNT_FORCE, MNT_DETACH = 1, 2
KDBUS_DIR = "/sys/fs/kdbus"
FS_CONTEXT = "system_u:object_r:sealbus_fs_t:s0"
_libc = ctypes.CDLL(None, use_errno=True)


def mount_options(fuse_fd: int, uid: int, gid: int, selinux_context: str | None = None) -> str:
    opts = f"fd={fuse_fd},rootmode=40000,user_id={uid},group_id={gid},allow_other,default_permissions"
    if selinux_context:
        opts += f",context={selinux_context}"
    return opts


def mount_payload_fs(mountpoint: str, uid: int, gid: int, selinux_context: str | None = None) -> int:
    """Mount a fresh payload fs at mountpoint (created 0755 if missing); returns the /dev/fuse fd to hand
    to the broker. nosuid, nodev, noexec: nothing on it can raise privilege or run."""
    os.makedirs(mountpoint, mode=0o755, exist_ok=True)
    if os.path.ismount(mountpoint):
        unmount_payload_fs(mountpoint)  # a stale mount from a crashed broker: nobody serves it any more
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    opts = mount_options(fd, uid, gid, selinux_context)
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    if _libc.mount(b"sealbus", mountpoint.encode(), b"fuse.sealbus", flags, opts.encode()) != 0:
        e = ctypes.get_errno()
        os.close(fd)
        raise OSError(e, f"mount of the payload fs at {mountpoint}: {os.strerror(e)}")
    return fd


def abort_payload_fs(mountpoint: str) -> bool:
    """End every request still waiting on the payload fs's server: a forced unmount (MNT_FORCE),
    whose first step in the kernel aborts the FUSE connection even when the mount is busy.

    A broker that dies while one of its own threads waits on its own mount
    cannot finish exiting (the wait is for itself); aborting the connection
    releases it. This needs only the unmount the launcher holds anyway, where
    fusectl's abort file would need write access to every FUSE mount without a
    context (fusectl and they share fusefs_t). Only our own fuse.sealbus mount,
    found in mountinfo: stat() of the mount would itself wait for the dead server.
    """
    # realpath of the parent only: resolving the mount point itself would stat it
    parent, name = os.path.split(os.path.abspath(mountpoint))
    if os.path.join(os.path.realpath(parent), name) not in sealbus_mounts():
        return False
    if _libc.umount2(mountpoint.encode(), MNT_FORCE) != 0:
        return ctypes.get_errno() == errno.EBUSY  # aborted, still mounted: unmount_payload_fs detaches it
    return True


def unmount_payload_fs(mountpoint: str) -> None:
    if _libc.umount2(mountpoint.encode(), MNT_DETACH) != 0:
        e = ctypes.get_errno()
        if e not in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
            raise OSError(e, f"unmount of {mountpoint}: {os.strerror(e)}")


def launcher_payload_fs(configured: str | None, runtime_dir: str, uid: int, gid: int,
                        selinux_on: bool) -> tuple[str | None, int | None]:  # fmt: skip
    """(mount point, /dev/fuse fd) of the system bus's payload fs: the configured mount, else the
    email's /sys/fs/kdbus where that directory exists, else <runtime dir>/fs; (None, None) without FUSE."""
    if not os.path.exists("/dev/fuse"):
        return None, None
    mount = configured or (KDBUS_DIR if os.path.isdir(KDBUS_DIR) else os.path.join(runtime_dir, "fs"))
    return mount, mount_payload_fs(mount, uid, gid, FS_CONTEXT if selinux_on else None)
