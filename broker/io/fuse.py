"""Serving the payload filesystem with pyfuse3 inside the bus's trio loop.

Two ways to get a mount: the launcher (root) mounts it with
``fd=N,...,allow_other,default_permissions`` and hands the broker the
/dev/fuse fd, served through ``/dev/fd/N``; or, in session mode, libfuse
mounts it here (mount(2) as root, fusermount3 otherwise). Expiry runs as a
trio task next to pyfuse3's workers.
"""

import functools
import logging
import os

import pyfuse3
import trio

from ..payload.backing import make_store_dir, remove_store_dir, session_store_parent
from ..payload.fusefs import PayloadOperations
from ..payload.store import SNAP_NAME, Limits, PayloadStore

log = logging.getLogger("sealbus.payload.fs")

MOUNT_OPTIONS = ("fsname=sealbus", "subtype=sealbus", "default_permissions", "nosuid", "nodev", "noexec")


async def run_expiry(store: PayloadStore) -> None:
    """Free expired payloads; wakes at the next deadline or at least every second."""
    while True:
        deadline = store.next_deadline()
        cap = min(1.0, store.limits.timeout_s)
        delay = cap if deadline is None else max(0.0, min(cap, deadline - store.clock()))
        await trio.sleep(delay)
        freed = store.expire()
        if freed:
            log.debug("payload fs: %d expired payload(s) freed", freed)


def _init(ops, mountpoint: str, fuse_fd: int | None) -> None:
    opts = set(pyfuse3.default_options) | set(MOUNT_OPTIONS)
    if fuse_fd is not None:
        pyfuse3.init(ops, f"/dev/fd/{fuse_fd}", opts)
        return
    try:
        pyfuse3.init(ops, mountpoint, opts | {"allow_other"})
    except RuntimeError:
        if os.getuid() == 0:
            raise
        # fusermount3 refuses allow_other without user_allow_other in /etc/fuse.conf:
        # a session bus's payload fs is then usable by its own user only.
        log.warning("payload fs: mounted without allow_other (only uid %d can use it)", os.getuid())
        pyfuse3.init(ops, mountpoint, opts)


def _prime_no_flush(store: PayloadStore) -> None:
    """Close one file of the mount from a worker thread, so the kernel learns FLUSH is unsupported.

    close() of a FUSE file normally waits for a FLUSH reply. The broker closes
    the payload fds clients pass through it from its trio thread, which is the
    thread that would answer: the first ENOSYS reply turns FLUSH off for the
    whole connection, and this makes sure that first one is not the broker's.
    """
    snap = store.probe_snapshot()
    path = os.path.join(store.mountpoint, SNAP_NAME.decode(), snap.name.decode())
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        os.unlink(path)
        os.close(fd)
    except OSError:
        store.drop_snapshot(snap)
        raise


async def serve_payload_fs(store: PayloadStore, mountpoint: str, *, fuse_fd: int | None = None,
                           store_dir: str | None = None, task_status=trio.TASK_STATUS_IGNORED) -> None:  # fmt: skip
    """Serve store at mountpoint until cancelled; started() reports the store once the mount answers.

    With fuse_fd the mount already exists (made by the launcher) and is only
    served; without it, it is mounted here and unmounted on the way out.
    store_dir: the store's backing directory, made for this mount and removed
    (with its fd) on the way out.
    """
    ops = PayloadOperations(store)
    _init(ops, mountpoint, fuse_fd)
    store.mountpoint = mountpoint
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            nursery.start_soon(run_expiry, store)
            # Our own mount: only from a worker thread.
            st = await trio.to_thread.run_sync(os.stat, mountpoint)
            store.st_dev = st.st_dev
            await trio.to_thread.run_sync(_prime_no_flush, store)
            log.info("payload fs served at %s", mountpoint)
            task_status.started(store)
    finally:
        store.mountpoint = None
        pyfuse3.close(unmount=fuse_fd is None)
        if store_dir is not None:
            remove_store_dir(store_dir, store.backing_dir_fd)


async def start_payload_fs(bus, settings, nursery, fuse_fd=None) -> None:
    """Serve the FUSE payload filesystem in the bus's trio loop and enable Claim.

    Contents go to unlinked files in the directory the launcher handed over
    (``settings.payload_store_fd``), else in a private directory made here and
    removed when serving stops (see ``payload.backing``).
    """
    if not settings.payload_fs:
        raise RuntimeError("a payload fs fd was given but no mount point (payload_fs)")
    store_fd, own_dir = settings.payload_store_fd, None
    if store_fd is None:
        own_dir, store_fd = make_store_dir(session_store_parent())
    store = PayloadStore(limits=Limits.from_settings(settings), backing_dir_fd=store_fd)
    bus.payload.attach_store(store, settings.payload_fs)
    await nursery.start(functools.partial(serve_payload_fs, store, settings.payload_fs, fuse_fd=fuse_fd,
                                          store_dir=own_dir))  # fmt: skip
    log.info("payload filesystem served at %s (contents in unlinked files under %s)", settings.payload_fs,
             own_dir or f"the launcher's directory, fd {store_fd}")  # fmt: skip


__all__ = ["serve_payload_fs", "start_payload_fs"]
