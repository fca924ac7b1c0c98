"""org.sealbus.Payload1.Claim: turn a sealed payload-fs file into a read-only fd.

The store checks the caller and consumes the cookie, then names a snapshot
inode (owned by the broker, mode 0400, sharing the bytes frozen at sealing)
under the hidden directory. The broker opens that snapshot through its own
mount and unlinks it, so the fd it returns is an ordinary read-only open file
that no path names. The open and unlink run in a worker thread: from the trio
thread they would wait for the FUSE server that this very thread runs.
"""

import os

import trio

from .store import E_CLAIM_FAILED, SNAP_NAME, ClaimError, PayloadStore


def _open_snapshot(path: str) -> tuple[int, int]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY)
    try:
        dev = os.fstat(fd).st_dev
        os.unlink(path)
    except BaseException:
        os.close(fd)
        raise
    return fd, dev


async def claim(store: PayloadStore, uid: int, cookie: str) -> tuple[int, int]:
    """(fd, size) of a fresh read-only snapshot of the payload sealed under cookie; raises ClaimError."""
    if store.mountpoint is None:
        raise ClaimError(E_CLAIM_FAILED, "the payload filesystem is not mounted")
    snap = store.claim(uid, cookie)
    path = os.path.join(store.mountpoint, SNAP_NAME.decode(), snap.name.decode())
    try:
        fd, dev = await trio.to_thread.run_sync(_open_snapshot, path)
    except OSError as e:
        store.drop_snapshot(snap)
        raise ClaimError(E_CLAIM_FAILED, f"could not open the snapshot: {e.strerror}") from None
    if store.st_dev is None:
        store.st_dev = dev
    return fd, snap.size


__all__ = ["ClaimError", "claim"]
