"""FdCloser: a client's FUSE file (FLUSH never answered) is closed off the caller's thread, and the
workers are shared fairly: per mount, per uid, with queued closes charged to the sender."""

import os
import queue
import socket
import threading
import time

import pytest

from broker.client.memfd import seal
from broker.payload.closer import FdCloser


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


@pytest.mark.timeout(30)
def test_blocking_close_goes_to_a_worker(tmp_path):
    closer = FdCloser(max_threads=2)
    (tmp_path / "hostile").mkdir()
    from tests import hostile_fuse as hf

    if os.geteuid() != 0:
        pytest.skip("mounting FUSE needs root here")
    with hf.mount(tmp_path / "hostile") as mnt:
        stuck = [os.open(mnt / "f", os.O_RDONLY) for _ in range(3)]
        t = time.monotonic()
        closer.close_all(stuck)
        assert time.monotonic() - t < 1  # the caller never waits for FLUSH
        time.sleep(0.3)
        assert closer.pending == 3  # two workers stuck in close(), one fd queued
        # fds that cannot block are still closed at once, on the caller's thread
        memfd, (r, w), (a, b) = seal(b"x"), os.pipe(), socket.socketpair()
        closer.close_all([memfd, r, w, a.detach(), b.detach()])
        assert closer.pending == 3
        assert not any(is_open(fd) for fd in (memfd, r, w))
    # the server died: the kernel aborted its connection, the stuck closes return
    deadline = time.monotonic() + 10
    while closer.pending and time.monotonic() < deadline:
        time.sleep(0.05)
    assert closer.pending == 0
    assert closer._threads == 2  # bounded


# -- fairness, with fake closes that block until the test lets them go (no sleeps) -------------------


class FakeFs:
    """Fake fds: ``fd // 100`` names the mount; closes on ``stuck`` mounts wait for ``release``."""

    def __init__(self, stuck=()):
        self.stuck = set(stuck)
        self.release = threading.Event()
        self.closed: queue.SimpleQueue = queue.SimpleQueue()

    def key(self, fd):
        return fd // 100  # never None: a fake fd must not reach os.close

    def close(self, fd):
        if self.key(fd) in self.stuck:
            self.release.wait()
        self.closed.put(fd)

    def wait_closed(self, n: int) -> set:
        return {self.closed.get(timeout=10) for _ in range(n)}


def closer_for(fs, **kw) -> FdCloser:
    return FdCloser(classify=fs.key, close_fn=fs.close, **kw)


@pytest.mark.timeout(30)
def test_a_stuck_mount_pins_one_worker_and_others_close():
    fs = FakeFs(stuck={1})
    c = closer_for(fs, max_threads=4)
    c.close_all(range(100, 110), uid=1000)  # 10 fds of a mount that never answers
    c.close_all(range(200, 230), uid=1001)  # another user's fds on another mount
    c.close_all(range(300, 305), uid=1000)  # and the first user's own fds elsewhere
    assert fs.wait_closed(35) == set(range(200, 230)) | set(range(300, 305))
    with c._cond:
        assert c._busy_mount == {1: 1}  # one close in progress on the stuck mount, nine queued
        assert c.pending == 10 and dict(c.charged) == {1000: 10}
        assert c._threads <= 4
    fs.release.set()
    assert fs.wait_closed(10) == set(range(100, 110))
    assert wait_until(lambda: c.pending == 0 and not c.charged)


@pytest.mark.timeout(30)
def test_one_uids_stuck_mounts_pin_at_most_its_share_of_workers():
    stuck = set(range(1, 7))
    fs = FakeFs(stuck=stuck)
    c = closer_for(fs, max_threads=4, per_uid_threads=2)
    for m in sorted(stuck):  # six mounts of one user, each never answering
        c.close(m * 100, uid=1000)
    c.close_all(range(900, 920), uid=1001)
    c.close_all(range(1000, 1010), uid=1002)
    assert fs.wait_closed(30) == set(range(900, 920)) | set(range(1000, 1010))
    with c._cond:
        assert c._busy_uid == {1000: 2}
        assert sum(c._busy_mount.values()) == 2
    fs.release.set()
    assert fs.wait_closed(6) == {m * 100 for m in stuck}
    assert wait_until(lambda: c.pending == 0)


@pytest.mark.timeout(30)
def test_queued_closes_are_charged_to_the_sender():
    fs = FakeFs(stuck={1})
    c = closer_for(fs, uid_share=5)
    assert not c.close_all(range(100, 105), uid=1000)  # 5: at its share
    assert not c.over_share(1000)
    assert c.close(105, uid=1000)  # the sixth is over it
    assert c.over_share(1000) and not c.over_share(1001)
    assert not c.close_all(range(106, 120))  # the bus's own fds (uid None) are never over
    fs.release.set()
    fs.wait_closed(20)
    assert wait_until(lambda: not c.over_share(1000) and not c.charged)


def wait_until(pred, timeout: float = 10) -> bool:
    """Poll a condition the workers make true (they report nothing else)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
