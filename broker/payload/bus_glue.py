"""Connect the payload layer (fd vetting, FUSE payload fs, Claim) to the bus."""

import logging
import os

from ..bus.router import BusError
from .vet import FdRefused, PayloadStats, VetContext, vet_fds

log = logging.getLogger("sealbus.payload")


class PayloadService:
    """What the bus driver and Debug.Stats see of the payload layer."""

    def __init__(self, mode: str):
        self.mode = mode
        self.stats = PayloadStats()
        self.ctx = VetContext()
        self.store = None  # the FUSE payload store, when served

    def stats_dict(self) -> dict[str, int]:
        return self.stats.as_dict()


def install_fd_vetting(bus, settings) -> None:
    mode = settings.fd_mode
    if mode not in ("any", "sealed", "none"):
        raise ValueError(f"unknown fd mode {mode!r}")
    svc = PayloadService(mode)
    bus.payload = svc

    def vet(peer, h, fds):
        try:
            infos = vet_fds(fds, mode, svc.ctx)
        except FdRefused as e:
            svc.stats.refused[e.reason] += 1
            raise BusError(e.error_name, e.message)
        svc.stats.record(infos)

    bus.fd_vetter = vet


def note_listening_sockets(bus, socks) -> None:
    """The bus's own listening sockets may never be passed through it."""
    if bus.payload is None:
        return
    for s in socks:
        st = os.fstat(s.fileno())
        bus.payload.ctx.listening.add((st.st_dev, st.st_ino))


async def start_payload_fs(bus, settings, nursery, fuse_fd=None) -> None:
    try:
        from ..io.fuse import serve_payload_fs  # the FUSE payload filesystem
    except ImportError:
        raise RuntimeError("the FUSE payload filesystem is not available in this build") from None
    await nursery.start(serve_payload_fs, bus, settings, fuse_fd)
