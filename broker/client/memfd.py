"""Sealed memfd payloads for applications: create, fill, seal; map read-only.

``seal(data)`` returns an fd carrying F_SEAL_SHRINK|GROW|WRITE|SEAL, ready to
pass as a D-Bus ``h`` argument; ``open_payload(fd)`` checks the seals and maps
it read-only, so the receiver knows the bytes cannot change under it.
"""

import errno
import fcntl
import mmap
import os

from ..payload.seals import (
    F_ADD_SEALS,
    MFD_ALLOW_SEALING,
    MFD_CLOEXEC,
    MFD_NOEXEC_SEAL,
    PAYLOAD_SEALS,
    get_seals,
    seal_names,
)

CHUNK = 1 << 20


class PayloadError(Exception):
    pass


class MappedForWrite(PayloadError):
    """F_SEAL_WRITE failed with EBUSY: a writable shared mapping of the memfd still exists."""


def memfd_create(name: str = "sealbus-payload") -> int:
    try:
        return os.memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_NOEXEC_SEAL)
    except OSError as e:
        if e.errno != errno.EINVAL:  # kernels before 6.3 do not know MFD_NOEXEC_SEAL
            raise
        return os.memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING)


def apply_seals(fd: int) -> None:
    try:
        fcntl.fcntl(fd, F_ADD_SEALS, PAYLOAD_SEALS)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise MappedForWrite(
                "cannot seal: a writable shared mapping of the payload still exists; unmap it first "
                "(F_SEAL_WRITE is refused while one does, which is what makes the seal trustworthy)"
            ) from None
        raise


def _copy_fd(src: int, dst: int, progress=None) -> int:
    """Copy the rest of ``src`` into ``dst`` inside the kernel where possible (no second copy here).

    copy_file_range within a filesystem, sendfile across, splice from pipes (stdin), and a
    bounded read/write loop for anything else.
    """
    total = 0
    for how in ("copy_file_range", "sendfile", "splice", "read"):
        try:
            while True:
                if how == "copy_file_range":
                    n = os.copy_file_range(src, dst, CHUNK * 16)
                elif how == "sendfile":  # across filesystems, where copy_file_range says EXDEV
                    n = os.sendfile(dst, src, None, CHUNK * 16)
                elif how == "splice":
                    n = os.splice(src, dst, CHUNK)
                else:
                    buf = os.read(src, CHUNK)
                    n = len(buf)
                    view = memoryview(buf)
                    while view:
                        view = view[os.write(dst, view) :]
                if n == 0:
                    return total
                total += n
                if progress:
                    progress(total)
        except OSError as e:
            # not supported for this pair of files: try the next way, from where we are
            if how == "read" or e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP,
                                                errno.EBADF, errno.ESPIPE):  # fmt: skip
                raise
    return total


def fill(fd: int, data, progress=None) -> int:
    """Write data (bytes, path, file object or iterator of bytes) to fd in bounded chunks: the byte count."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data).cast("B")
        total = 0
        while total < len(view):
            total += os.write(fd, view[total : total + CHUNK])
            if progress:
                progress(total)
        return total
    if isinstance(data, (str, os.PathLike)):
        with open(data, "rb", buffering=0) as f:
            return _copy_fd(f.fileno(), fd, progress)
    if hasattr(data, "fileno"):
        if hasattr(data, "flush") and "r" not in getattr(data, "mode", "r"):
            data.flush()
        return _copy_fd(data.fileno(), fd, progress)
    total = 0
    for chunk in data:  # an iterator of bytes-like chunks, written as they come (never joined)
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload iterator yielded {type(chunk).__name__}, not bytes")
        total += fill(fd, chunk)
        if progress:
            progress(total)
    return total


def seal(data, name: str = "sealbus-payload", progress=None) -> int:
    """A new memfd holding ``data`` (bytes, memoryview, path, file object or iterator of bytes), sealed
    with F_SEAL_SHRINK|GROW|WRITE|SEAL. The caller owns the returned fd (O_CLOEXEC).

    A file object is read from its OS-level position: pass an unbuffered one
    (or one nothing was read from yet) so buffered read-ahead is not skipped.
    """
    fd = memfd_create(name)
    try:
        fill(fd, data, progress)
        apply_seals(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_sealed(fd: int) -> int:
    seals = get_seals(fd)
    if seals is None:
        raise PayloadError("not a sealable file (memfd); cannot trust it not to change")
    missing = PAYLOAD_SEALS & ~seals
    if missing:
        raise PayloadError(f"payload lacks seals {seal_names(missing)} (has {seal_names(seals)})")
    return seals


def open_payload(fd: int, *, allow_unsealed: bool = False) -> memoryview:
    """Map a received payload read-only (after checking its seals unless told not to)."""
    if not allow_unsealed:
        check_sealed(fd)
    size = os.fstat(fd).st_size
    if size == 0:
        return memoryview(b"")
    m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    return memoryview(m)
