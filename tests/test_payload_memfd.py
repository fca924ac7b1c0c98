"""Client helpers: seal() from every kind of source, open_payload() checks, the EBUSY mapping case."""

import fcntl
import hashlib
import mmap
import os
import stat
import subprocess

import pytest

from broker.client.memfd import MappedForWrite, PayloadError, apply_seals, memfd_create, open_payload, seal
from broker.payload import seals
from broker.payload.seals import get_seals

# Protocol constants pinned here (the kernel's <linux/fcntl.h>, kdbus's four seals), not imported
# from the implementation: a wrong value there must fail these tests, not move them along.
F_ADD_SEALS = 1033
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 0x1, 0x2, 0x4, 0x8
F_SEAL_FUTURE_WRITE, F_SEAL_EXEC = 0x10, 0x20
PAYLOAD_SEALS = 0xF  # SHRINK | GROW | WRITE | SEAL

MiB = 1 << 20


def test_seal_constants_are_the_kernels():
    assert (seals.F_ADD_SEALS, seals.F_GET_SEALS) == (F_ADD_SEALS, 1034)
    assert (seals.F_SEAL_SEAL, seals.F_SEAL_SHRINK, seals.F_SEAL_GROW, seals.F_SEAL_WRITE) == (1, 2, 4, 8)
    assert (seals.F_SEAL_FUTURE_WRITE, seals.F_SEAL_EXEC, seals.MFD_NOEXEC_SEAL) == (0x10, 0x20, 0x8)
    assert seals.PAYLOAD_SEALS == PAYLOAD_SEALS


def test_64mib_round_trip_from_bytes():
    data = os.urandom(MiB) * 64
    digest = hashlib.sha256(data).hexdigest()
    fd = seal(data)
    del data
    try:
        assert get_seals(fd) & PAYLOAD_SEALS == PAYLOAD_SEALS
        view = open_payload(fd)
        assert len(view) == 64 * MiB
        assert hashlib.sha256(view).hexdigest() == digest
        with pytest.raises(TypeError):
            view[0] = 0  # mapped read-only
        with pytest.raises(PermissionError):
            os.write(fd, b"x")  # F_SEAL_WRITE
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 1)  # F_SEAL_SHRINK
        with pytest.raises(PermissionError):
            fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_EXEC)  # F_SEAL_SEAL: no seal can be added or removed
    finally:
        os.close(fd)


def test_memfd_flags():
    fd = seal(b"abc")
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        mode = os.fstat(fd).st_mode
        assert stat.S_ISREG(mode)
        if get_seals(fd) & F_SEAL_EXEC:  # the kernel took MFD_NOEXEC_SEAL (6.3+)
            assert not mode & 0o111
    finally:
        os.close(fd)


def test_seal_from_path_file_pipe_and_iterator(tmp_path):
    data = os.urandom(3 * MiB + 17)
    p = tmp_path / "src"
    p.write_bytes(data)
    fds = [seal(p), seal(str(p))]
    with open(p, "rb", buffering=0) as f:
        fds.append(seal(f))
    proc = subprocess.Popen(["cat", str(p)], stdout=subprocess.PIPE)  # a pipe: the splice path
    fds.append(seal(proc.stdout))
    proc.wait(timeout=10)
    fds.append(seal(data[i : i + 65536] for i in range(0, len(data), 65536)))
    fds.append(seal(memoryview(data)))
    for fd in fds:
        assert bytes(open_payload(fd)) == data
        os.close(fd)


def test_seal_reports_progress(tmp_path):
    p = tmp_path / "src"
    p.write_bytes(b"z" * (5 * MiB))
    seen = []
    fd = seal(p, progress=seen.append)
    os.close(fd)
    assert seen and seen[-1] == 5 * MiB and seen == sorted(seen)


def test_iterator_of_str_is_refused():
    with pytest.raises(TypeError):
        seal(iter(["not bytes"]))


def test_empty_payload():
    fd = seal(b"")
    assert bytes(open_payload(fd)) == b""
    os.close(fd)


def test_writable_mapping_blocks_seal_write_and_helper_explains():
    """A writable MAP_SHARED mapping would let the sender change the bytes after sealing: the kernel
    refuses F_SEAL_WRITE with EBUSY; apply_seals turns that into a clear error and nothing is half-sealed."""
    fd = memfd_create("t")
    os.ftruncate(fd, 4096)
    m = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    m[:5] = b"hello"
    with pytest.raises(MappedForWrite, match="writable shared mapping"):
        apply_seals(fd)
    assert not get_seals(fd) & F_SEAL_WRITE
    with pytest.raises(OSError) as ei:  # the raw kernel behaviour the helper explains
        fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE)
    assert ei.value.errno == 16  # EBUSY
    m.close()
    apply_seals(fd)
    assert get_seals(fd) & PAYLOAD_SEALS == PAYLOAD_SEALS
    assert bytes(open_payload(fd)[:5]) == b"hello"
    os.close(fd)


def test_open_payload_refuses_unsealed_and_non_memfd(tmp_path):
    fd = memfd_create("t")
    os.write(fd, b"data")
    with pytest.raises(PayloadError, match="lacks seals"):
        open_payload(fd)
    assert bytes(open_payload(fd, allow_unsealed=True)) == b"data"
    os.close(fd)
    (tmp_path / "f").write_bytes(b"file")
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    with pytest.raises(PayloadError, match="not a sealable"):
        open_payload(fd)
    os.close(fd)
