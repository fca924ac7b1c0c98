"""PayloadStore rules without a mount (sans-IO): cookies, quotas, expiry, sharing, file backing."""

import errno
import os
import stat
import subprocess
import tempfile

import pytest

from broker.payload.store import (
    SNAP_INO,
    TMP_INO,
    ClaimError,
    Limits,
    PayloadStore,
    StoreError,
)

# The error names of the protocol (exact, as clients match on them), pinned here, not imported
# from the implementation.
E_COOKIE_UNKNOWN = "org.sealbus.Error.CookieUnknown"
E_COOKIE_EXPIRED = "org.sealbus.Error.CookieExpired"
E_COOKIE_FOREIGN = "org.sealbus.Error.CookieForeign"
E_COOKIE_USED = "org.sealbus.Error.CookieUsed"


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def make(**kw):
    clock = Clock()
    backing = kw.pop("backing_dir_fd", None)
    return PayloadStore(broker_uid=999, broker_gid=999, limits=Limits(**kw), clock=clock,
                        backing_dir_fd=backing), clock  # fmt: skip


def sealed_file(s, uid=1000, data=b"hello", name=b"f"):
    n = s.create(TMP_INO, name, uid, uid)
    s.opened(n)
    s.write(n, 0, data)
    return n, s.seal(n, uid)


def err(fn, *a):
    with pytest.raises(StoreError) as e:
        fn(*a)
    return e.value.errno


def claim_err(s, uid, cookie):
    with pytest.raises(ClaimError) as e:
        s.claim(uid, cookie)
    return e.value.error_name


def test_cookie_is_128_random_bits_and_single_use():
    s, _ = make()
    n, c = sealed_file(s)
    _, c2 = sealed_file(s, name=b"g")
    assert len(c) == 32 and int(c, 16) >= 0 and c != c2
    assert s.cookie_of(n, 1000) == c.encode()
    assert err(s.cookie_of, n, 1001) == errno.EACCES
    assert claim_err(s, 1001, c) == E_COOKIE_FOREIGN
    snap = s.claim(1000, c)
    assert snap.kind == "snapshot" and snap.uid == 999 and stat.S_IMODE(snap.mode) == 0o400
    assert snap.contents is n.contents  # shared, not copied
    assert claim_err(s, 1000, c) == E_COOKIE_USED
    assert claim_err(s, 1001, c) == E_COOKIE_FOREIGN
    assert claim_err(s, 1000, "nope") == E_COOKIE_UNKNOWN
    assert claim_err(s, 1000, None) == E_COOKIE_UNKNOWN


def test_unsealed_has_no_cookie_and_sealed_refuses_changes():
    s, _ = make()
    n = s.create(TMP_INO, b"f", 1000, 1000)
    assert err(s.cookie_of, n, 1000) == errno.ENODATA
    assert err(s.seal, n, 1001) == errno.EPERM  # only the creator seals
    s.write(n, 0, b"abc")
    s.seal(n, 1000)
    assert err(s.write, n, 0, b"x") == errno.EPERM
    assert err(s.truncate, n, 0) == errno.EPERM
    assert err(s.seal, n, 1000) == errno.EPERM
    assert err(s.check_open, n, 1000, True, False) == errno.EPERM
    assert s.read(n, 0, 10) == b"abc"


def test_names_visible_only_to_their_owner():
    s, _ = make()
    s.create(TMP_INO, b"f", 1000, 1000)
    assert err(s.lookup, TMP_INO, b"f", 1001) == errno.ENOENT
    assert err(s.unlink, TMP_INO, b"f", 1001) == errno.ENOENT
    assert err(s.create, TMP_INO, b"f", 1001, 1001) == errno.EEXIST
    assert [n for n, _ in s.list_dir(TMP_INO, 1001)] == []
    assert err(s.create, SNAP_INO, b"x", 1000, 1000) == errno.EACCES
    assert err(s.lookup, 1, b".sealbus-snapshots", 1000) == errno.ENOENT
    assert [n for n, _ in s.list_dir(1, 1000)] == [b"tmp"]


def test_quotas_per_uid_and_whole_store():
    s, _ = make(bytes_per_user=100, files_per_user=2, total_bytes=150, total_files=3)
    a = s.create(TMP_INO, b"a", 1, 1)
    assert err(s.write, a, 0, b"x" * 101) == errno.EDQUOT
    assert err(s.write, a, 1 << 40, b"x") == errno.EDQUOT  # a hole is charged before it is allocated
    s.write(a, 0, b"x" * 100)
    s.create(TMP_INO, b"a2", 1, 1)
    assert err(s.create, TMP_INO, b"a3", 1, 1) == errno.EDQUOT
    b = s.create(TMP_INO, b"b", 2, 2)
    assert err(s.write, b, 0, b"y" * 51) == errno.ENOSPC
    s.write(b, 0, b"y" * 50)
    assert err(s.create, TMP_INO, b"c", 3, 3) == errno.ENOSPC
    s.truncate(a, 10)
    assert s.usage(1) == (10, 2)


def test_expiry_of_sealed_and_of_closed_unsealed_files():
    s, clock = make(timeout_s=30)
    n, c = sealed_file(s)
    s.released(n)  # closed before claiming: kept
    s.unlink(TMP_INO, b"f", 1000)
    u = s.create(TMP_INO, b"u", 1000, 1000)
    s.opened(u)
    s.write(u, 0, b"12345")
    s.released(u)  # closed, named, never sealed
    still_open = s.create(TMP_INO, b"o", 1000, 1000)
    s.opened(still_open)
    assert s.usage(1000) == (10, 3)
    clock.t += 29
    assert s.expire() == 0
    clock.t += 2
    assert s.expire() == 2
    assert claim_err(s, 1000, c) == E_COOKIE_EXPIRED
    assert claim_err(s, 1001, c) == E_COOKIE_FOREIGN
    assert s.usage(1000) == (0, 1)
    assert err(s.lookup, TMP_INO, b"u", 1000) == errno.ENOENT


def test_claimed_bytes_live_until_the_last_snapshot_is_closed():
    s, _ = make()
    n, c = sealed_file(s, data=b"x" * 1000)
    snap = s.claim(1000, c)
    s.opened(snap)
    s.forget(snap.ino, 0)
    s.released(n)
    s.unlink(TMP_INO, b"f", 1000)
    assert s.usage(1000) == (1000, 0)
    s.st_dev = 42
    assert s.is_snapshot(42, snap.ino) and not s.is_snapshot(43, snap.ino) and not s.is_snapshot(42, n.ino)
    s.drop_snapshot(snap)  # unlinked
    s.released(snap)
    assert s.usage(1000) == (0, 0)
    assert not s.is_snapshot(42, snap.ino)


def test_file_backed_contents():
    d = tempfile.mkdtemp()
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        s, _ = make(backing_dir_fd=dfd)
        n, c = sealed_file(s, data=b"abc" * 5000)
        assert os.listdir(d) == []  # unlinked: no path names it
        snap = s.claim(1000, c)
        assert s.read(snap, 3, 6) == b"abcabc"
        assert s.read(snap, 15000, 10) == b""
    finally:
        os.close(dfd)
        os.rmdir(d)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs: needs root")
def test_full_backing_filesystem_refuses_the_write_and_returns_the_charge():
    """The backing directory's filesystem fills up before the quota does: the write that does not fit
    fails with ENOSPC (what the sender's write() sees), its charge is taken back, and the file keeps
    what it had."""
    d = tempfile.mkdtemp()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=700", "sealbus-test", d], check=True)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        s, _ = make(backing_dir_fd=dfd, bytes_per_user=64 << 20, total_bytes=64 << 20)
        n = s.create(TMP_INO, b"f", 1000, 1000)
        s.opened(n)
        s.write(n, 0, b"a" * 4096)
        assert err(s.write, n, 4096, b"b" * (2 << 20)) == errno.ENOSPC
        assert s.usage(1000) == (4096, 1) and n.size == 4096
        assert s.read(n, 0, 1 << 20) == b"a" * 4096
        s.write(n, 4096, b"c" * 1000)  # what fits still goes in
        assert s.usage(1000)[0] == 5096
        s.unlink(TMP_INO, b"f", 1000)
        s.released(n)  # the last close: the backing file goes, with its charge
        assert s.usage(1000) == (0, 0)
    finally:
        os.close(dfd)
        subprocess.run(["umount", d], check=False)
        os.rmdir(d)
