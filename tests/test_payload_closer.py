"""FdCloser: a client's FUSE file (FLUSH never answered) is closed off the caller's thread."""

import os
import socket
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
