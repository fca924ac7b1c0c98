"""An unprivileged payload-fs server for tests/test_fuse_payload.py (session mode, fusermount3).

Run as a normal user with a mount point it owns: mounts through fusermount3,
makes a sealed payload on its own mount from a worker thread with write()
(as a client of the same uid would; never with mmap, see below), claims it from the trio loop, reads it back, unmounts.
Prints one JSON line with what it saw.
"""

import json
import os
import sys

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from broker.client import fuse_payload
from broker.io.fuse import serve_payload_fs
from broker.payload.claim import claim
from broker.payload.store import Limits, PayloadStore


async def main(mount: str) -> dict:
    store = PayloadStore(limits=Limits(timeout_s=5))
    data = os.urandom(100_000)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve_payload_fs(store, mount, task_status=task_status))
        found = await trio.to_thread.run_sync(fuse_payload.find_mount, [mount])
        # write(), not mmap: a process must never map its own FUSE mount (a page fault waiting for this
        # very process's loop holds mmap_lock, and the loop's next mmap/munmap waits for it: deadlock).
        fd, cookie = await trio.to_thread.run_sync(lambda: fuse_payload.create_sealed(mount, data, use_mmap=False))
        snap, size = await claim(store, os.getuid(), cookie)
        got = await trio.to_thread.run_sync(os.pread, snap, size + 10, 0)
        await trio.to_thread.run_sync(os.close, snap)
        await trio.to_thread.run_sync(os.close, fd)
        nursery.cancel_scope.cancel()
    return {"uid": os.getuid(), "found": found, "same": got == data, "size": size}


if __name__ == "__main__":
    print(json.dumps(trio.run(main, sys.argv[1])), flush=True)
