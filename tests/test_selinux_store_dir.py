"""The payload store directory gets its own SELinux type (sealbus_store_t) by a named type transition,
so the launcher makes it under a fixed name in its root-owned runtime directory (issue 20): shown on
the code. The type itself: tests/test_selinux_policy.py::test_payload_store_has_its_own_type and the
enforcing tier (tests/vm/enforcing_tier.py::case_payload_store)."""

import errno
import os
import pwd

import pytest

from broker.payload.backing import LAUNCHER_STORE_NAME, make_store_dir, remove_store_dir


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse")
def test_launcher_makes_the_store_under_the_name_the_policy_types():
    from tests.test_privsep import SystemBus

    bus = SystemBus()
    store = bus.runtime / LAUNCHER_STORE_NAME
    try:
        st = store.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, pwd.getpwnam("sealbus").pw_gid, 0o770)
        fds = os.listdir(f"/proc/{bus.broker_pid}/fd")
        assert str(store) in {os.readlink(f"/proc/{bus.broker_pid}/fd/{fd}") for fd in fds}  # the broker's dir fd
        assert [p.name for p in bus.runtime.glob("sealbus-store-*")] == [LAUNCHER_STORE_NAME]
    finally:
        assert bus.stop() == 0, bus.logtext()
    assert not store.exists()


def test_an_empty_leftover_store_is_replaced(tmp_path):
    """A launcher killed with SIGKILL leaves the (empty) directory behind: the next one starts anyway."""
    (tmp_path / LAUNCHER_STORE_NAME).mkdir(mode=0o755)
    path, fd = make_store_dir(str(tmp_path), name=LAUNCHER_STORE_NAME)
    try:
        assert path == str(tmp_path / LAUNCHER_STORE_NAME)
        assert os.fstat(fd).st_mode & 0o777 == 0o700  # made anew, not the leftover's 0755
    finally:
        remove_store_dir(path, fd)
    assert not os.path.exists(path)


def test_anything_else_under_the_store_name_is_an_error(tmp_path):
    """Never reused or followed: a directory with contents, or a link to one, stops start-up untouched."""
    taken = tmp_path / LAUNCHER_STORE_NAME
    taken.mkdir()
    (taken / "planted").write_text("x")
    with pytest.raises(OSError) as err:
        make_store_dir(str(tmp_path), name=LAUNCHER_STORE_NAME)
    assert err.value.errno == errno.ENOTEMPTY and (taken / "planted").read_text() == "x"

    elsewhere = tmp_path / "elsewhere"
    taken.rename(elsewhere)
    taken.symlink_to(elsewhere)
    with pytest.raises(OSError) as err:
        make_store_dir(str(tmp_path), name=LAUNCHER_STORE_NAME)
    assert err.value.errno == errno.ENOTDIR and taken.is_symlink() and (elsewhere / "planted").exists()
