"""Connect the payload layer (fd vetting, FUSE payload fs, Claim) to the bus."""

import logging
import os

from ..bus.log_fields import DENIED, about_peer
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
        self.mount: str | None = None  # and where it is mounted (the MountPoint property)

    def attach_store(self, store, mount: str) -> None:
        """The FUSE payload store is served at mount (by the io layer): enable Claim and snapshot fds."""
        self.store = store
        self.mount = mount
        self.ctx.is_payload_snapshot = store.is_snapshot

    def stats_dict(self) -> dict[str, int]:
        return self.stats.as_dict()

    def start_claim(self, bus, peer, serial: int, cookie: str) -> None:
        """org.sealbus.Payload1.Claim: answered later, the snapshot is opened off the loop."""
        if self.store is None:
            bus.send_error(peer, serial, "org.sealbus.Error.PayloadFsUnavailable",
                           "this bus does not serve a payload filesystem (start it with --payload-fs)")  # fmt: skip
            return
        if not peer.unix_fds:
            bus.send_error(peer, serial, "org.freedesktop.DBus.Error.NotSupported",
                           "Claim returns an fd: negotiate Unix fd passing first")  # fmt: skip
            return
        bus.spawn(self._claim, bus, peer, serial, cookie)

    async def _claim(self, bus, peer, serial: int, cookie: str) -> None:
        from .claim import claim
        from .store import ClaimError

        try:
            fd, size = await claim(self.store, peer.creds.uid, cookie)
        except ClaimError as e:
            log.warning("claim refused for %s: %s", peer.describe(), e.message,
                        extra=about_peer(DENIED, peer, error=e.error_name))  # fmt: skip
            if not peer.state:  # ACTIVE
                bus.send_error(peer, serial, e.error_name, e.message)
        else:
            if peer.state:  # not ACTIVE
                from .closer import closer

                closer.close(fd)  # a file of our own FUSE mount: close() from this thread would wait for us
            else:
                bus.send_reply_fds(peer, serial, "ht", (0, size), [fd])
        bus.server.flush_dirty()


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
