"""Connect the payload layer (fd vetting, FUSE payload fs, Claim) to the bus."""

import logging

from ..bus.router import BusError

log = logging.getLogger("sealbus.payload")


def install_fd_vetting(bus, settings) -> None:
    mode = settings.fd_mode
    if mode not in ("any", "sealed", "none"):
        raise ValueError(f"unknown fd mode {mode!r}")

    def vet(peer, h, fds):
        if mode == "none":
            raise BusError("org.sealbus.Error.FdRefused", "this bus does not carry file descriptors (fd mode none)")

    bus.fd_vetter = vet


async def start_payload_fs(bus, settings, nursery, fuse_fd=None) -> None:
    raise RuntimeError("the FUSE payload filesystem is not available yet")
