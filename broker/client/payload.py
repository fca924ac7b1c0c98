"""Which payload transport to use, and which received fds can be trusted not to change.

Senders call ``make_payload``: a sealed memfd where this kernel can seal one,
the FUSE payload filesystem (a broker-made read-only snapshot) otherwise, so
application code does not care which system it runs on. Receivers call
``trusted_kind`` (or ``open_trusted``): a memfd carrying the four seals, or a
read-only file on the payload fs *their bus* announces (the broker made that
snapshot from its own copy and only it could change it).
"""

import errno
import fcntl
import os
import stat

from ..payload.mounts import sealbus_mounts
from ..payload.seals import F_ADD_SEALS, PAYLOAD_SEALS, get_seals
from .memfd import PayloadError, check_sealed, memfd_create, open_payload, seal

_sealing: bool | None = None


def memfd_sealing_works() -> bool:
    """Whether this kernel (and any seccomp filter we run under) lets us create and seal a memfd."""
    global _sealing
    if _sealing is None:
        try:
            fd = memfd_create("sealbus-probe")
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.EINVAL, errno.EPERM, errno.EACCES):
                raise
            _sealing = False
        else:
            try:
                fcntl.fcntl(fd, F_ADD_SEALS, PAYLOAD_SEALS)
                _sealing = (get_seals(fd) or 0) & PAYLOAD_SEALS == PAYLOAD_SEALS
            except OSError:
                _sealing = False
            finally:
                os.close(fd)
    return _sealing


def make_payload(source, conn=None, *, via: str = "auto", mount: str | None = None, progress=None) -> tuple[int, str]:
    """(fd, transport) for ``source`` (bytes, path, or unbuffered file): transport is "memfd" or "fuse".

    ``via="auto"`` picks memfd when sealing works and the FUSE payload fs (which needs ``conn``, the
    bus connection that will Claim the snapshot) otherwise; "memfd" or "fuse" force one.
    """
    if via not in ("auto", "memfd", "fuse"):
        raise ValueError(f"unknown payload transport {via!r}")
    if via == "memfd" or (via == "auto" and memfd_sealing_works()):
        return seal(source, progress=progress), "memfd"
    if conn is None:
        raise PayloadError("memfd sealing is unavailable here and no bus connection was given for the FUSE path")
    from . import fuse_payload

    mount = mount or fuse_payload.find_mount(_announced_mount(conn))
    if mount is None:
        raise PayloadError("memfd sealing is unavailable here and no sealbus payload filesystem is mounted "
                           "(start the bus with --payload-fs, or set SEALBUS_PAYLOAD_FS)")  # fmt: skip
    fd, _size = fuse_payload.payload_fd(conn, source, mount, progress=progress)
    return fd, "fuse"


def _announced_mount(conn) -> list[str]:
    """The mount point the bus says it serves (org.sealbus.Payload1.MountPoint), if it says one."""
    from jeepney import DBusAddress, MessageType, Properties

    addr = DBusAddress("/org/freedesktop/DBus", bus_name="org.freedesktop.DBus", interface="org.sealbus.Payload1")
    try:
        reply = conn.send_and_get_reply(Properties(addr).get("MountPoint"), timeout=10)
    except (OSError, TimeoutError):
        return []
    if reply.header.message_type != MessageType.method_return:
        return []
    sig, value = reply.body[0]
    return [value] if sig == "s" and value else []


def snapshot_devices(conn) -> set[int]:
    """The device of the payload fs the bus on ``conn`` serves: the only place snapshots are trusted from.

    Asking the bus (not scanning mounts) matters: any user can mount a FUSE fs of type fuse.sealbus
    with fusermount3 and hand out read-only-looking files whose contents it changes at will.
    """
    out = set()
    for mnt in _announced_mount(conn):
        if os.path.realpath(mnt) in sealbus_mounts():
            out.add(os.stat(mnt).st_dev)
    return out


def trusted_kind(fd: int, snapshot_devs: set[int] = frozenset()) -> str:
    """ "sealed-memfd", or "payload-snapshot" (on a device from ``snapshot_devices``); PayloadError for
    anything that could still change."""
    if get_seals(fd) is not None:
        check_sealed(fd)
        return "sealed-memfd"
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_dev in snapshot_devs:
        if st.st_mode & 0o222 or fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY:
            raise PayloadError("a payload-fs file that is still writable: not a broker snapshot")
        return "payload-snapshot"
    raise PayloadError("neither a sealed memfd nor a payload-fs snapshot; cannot trust it not to change")


def open_trusted(fd: int, snapshot_devs: set[int] = frozenset()) -> tuple[memoryview, str]:
    kind = trusted_kind(fd, snapshot_devs)
    return open_payload(fd, allow_unsealed=True), kind
