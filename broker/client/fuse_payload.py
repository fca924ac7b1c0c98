"""Client side of the FUSE fallback: make a sealed payload-fs file and claim its snapshot.

For systems without memfd sealing. The dance: mkstemp in <mount>/tmp,
unlink, write (streamed from a file in chunks, or mmap + msync for bytes), seal with an xattr, read the cookie, then
ask the bus (org.sealbus.Payload1.Claim) for a read-only snapshot fd that can
be passed in any message.
"""

import mmap
import os
import tempfile

from ..payload.mounts import sealbus_mounts
from .memfd import fill

SEAL_XATTR = "user.sealbus.seal"
COOKIE_XATTR = "user.sealbus.cookie"
DEFAULT_MOUNTS = ("/run/sealbus/fs", "/sys/fs/kdbus")


def find_mount(candidates=None) -> str | None:
    """The first candidate that is a sealbus payload fs (has tmp/ and is a FUSE mount of ours)."""
    env = os.environ.get("SEALBUS_PAYLOAD_FS")
    cands = [env] if env else []
    cands += list(candidates or ())
    rt = os.environ.get("XDG_RUNTIME_DIR")
    if rt:
        cands.append(os.path.join(rt, "sealbus", "fs"))
    cands += DEFAULT_MOUNTS
    mounts = sealbus_mounts()
    for c in cands:
        if c and os.path.realpath(c) in mounts:
            return c
    return None


def create_sealed(mount: str, data, *, use_mmap: bool = True, progress=None) -> tuple[int, str]:
    """Write data into a fresh payload-fs file and seal it: (fd, cookie). The caller closes fd.

    data: bytes (mapped and msync'ed with use_mmap), or a path, file object or iterator of bytes,
    streamed in bounded chunks (in the kernel where it can: sendfile) so a payload of any size costs
    this process no more than a chunk; progress(bytes so far) is called as it goes.
    """
    fd, path = tempfile.mkstemp(dir=os.path.join(mount, "tmp"))
    try:
        os.unlink(path)
        if use_mmap and isinstance(data, (bytes, bytearray, memoryview)) and data:
            os.ftruncate(fd, len(data))
            with mmap.mmap(fd, len(data), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
                m[:] = data
                m.flush()  # msync: the bytes must reach the broker before the seal
            if progress:
                progress(len(data))
        else:
            fill(fd, data, progress)
        seal(fd)
        return fd, cookie(fd)
    except BaseException:
        os.close(fd)
        raise


def seal(fd: int) -> None:
    os.setxattr(fd, SEAL_XATTR, b"")


def cookie(fd: int) -> str:
    return os.getxattr(fd, COOKIE_XATTR).decode("ascii")


def claim(conn, cookie_hex: str, timeout: float | None = 10.0) -> tuple[int, int]:
    """Payload1.Claim over a blocking jeepney connection (opened with enable_fds=True): (fd, size)."""
    from jeepney import DBusAddress, new_method_call

    bus = DBusAddress("/org/freedesktop/DBus", bus_name="org.freedesktop.DBus", interface="org.sealbus.Payload1")
    reply = conn.send_and_get_reply(new_method_call(bus, "Claim", "s", (cookie_hex,)), timeout=timeout)
    from jeepney import MessageType

    if reply.header.message_type == MessageType.error:
        from jeepney.wrappers import DBusErrorResponse

        raise DBusErrorResponse(reply)
    h, size = reply.body
    return h.to_raw_fd(), size


def payload_fd(conn, data, mount: str | None = None, *, use_mmap: bool = True, progress=None) -> tuple[int, int]:
    """A read-only snapshot fd holding data (see create_sealed), made through the payload fs: (fd, size)."""
    mount = mount or find_mount()
    if mount is None:
        raise FileNotFoundError("no sealbus payload filesystem is mounted")
    fd, ck = create_sealed(mount, data, use_mmap=use_mmap, progress=progress)
    try:
        return claim(conn, ck)
    finally:
        os.close(fd)


__all__ = ["claim", "cookie", "create_sealed", "find_mount", "payload_fd", "seal"]
