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


def _fill(fd: int, data, progress=None) -> int:
    total = 0
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data).cast("B")
        while total < len(view):
            total += os.write(fd, view[total : total + CHUNK])
            if progress:
                progress(total)
        return total
    if isinstance(data, (str, os.PathLike)):
        with open(data, "rb") as f:
            return _fill(fd, f, progress)
    if hasattr(data, "fileno"):
        src = data.fileno()
        size = os.fstat(src).st_size
        # copy inside the kernel: no second copy in this process
        while True:
            try:
                n = os.copy_file_range(src, fd, max(CHUNK, size - total) if size else CHUNK)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                n = os.sendfile(fd, src, None, CHUNK)
            if n == 0:
                return total
            total += n
            if progress:
                progress(total)
    for chunk in data:  # an iterator of bytes
        total += _fill(fd, chunk)
        if progress:
            progress(total)
    return total


def seal(data, name: str = "sealbus-payload", progress=None) -> int:
    """A new memfd holding ``data`` (bytes, path, file object or iterator), sealed."""
    fd = memfd_create(name)
    try:
        _fill(fd, data, progress)
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
