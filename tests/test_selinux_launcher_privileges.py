"""What let the policy drop privileges from sealbus_launch_t (issue 20, item 5), shown on the code:

- the runtime directory stays root-owned (no chown, fowner or DAC override needed);
- a payload fs whose server hangs is aborted with a forced unmount, which the
  launcher's `filesystem unmount` on sealbus_fs_t covers, instead of fusectl's
  abort file (write on fusefs_t: every FUSE mount without a context).
"""

import errno
import os
import subprocess
import sys
import tempfile
import time

import pytest

from broker.launch.payload_mount import abort_payload_fs, mount_payload_fs, unmount_payload_fs
from broker.payload.mounts import sealbus_mounts
from tests.test_privsep import SystemBus

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse")

STAT_CHILD = """
import errno, os, sys
try:
    os.stat(os.path.join(sys.argv[1], "x"))
    print("stat returned")
except OSError as e:
    print(errno.errorcode[e.errno])
"""


def test_runtime_dir_stays_root_owned():
    bus = SystemBus()
    try:
        st = bus.runtime.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o755)
        assert bus.socket.exists()
    finally:
        assert bus.stop() == 0, bus.logtext()


def _waiting_on_fuse(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/wchan") as f:
            wchan = f.read()
    except OSError:
        return False
    return "fuse" in wchan or "request_wait" in wchan


def test_forced_unmount_aborts_a_hung_payload_fs():
    """Nobody serves the mount: a stat on it waits in the kernel until the launcher aborts it."""
    mnt = tempfile.mkdtemp(prefix="sealbus-hung-")
    fuse_fd = mount_payload_fs(mnt, 0, 0)
    child = None
    try:
        assert mnt in sealbus_mounts()
        child = subprocess.Popen([sys.executable, "-c", STAT_CHILD, mnt], stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not _waiting_on_fuse(child.pid) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.poll() is None, child.stdout.read()  # really waiting on the unserved mount
        assert abort_payload_fs(mnt)
        out, _ = child.communicate(timeout=30)
        assert out.strip() == errno.errorcode[errno.ENOTCONN]  # the aborted connection's answer
    finally:
        if child is not None and child.poll() is None:
            child.kill()
        unmount_payload_fs(mnt)
        os.close(fuse_fd)
        os.rmdir(mnt)
    assert mnt not in sealbus_mounts()


def test_abort_touches_only_payload_mounts(tmp_path):
    assert abort_payload_fs(str(tmp_path)) is False
