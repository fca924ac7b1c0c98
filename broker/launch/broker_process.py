"""The broker process of `sealbus run --system` (entry point: /usr/libexec/sealbus/sealbus-broker).

Started by the launcher with the listening socket(s) and a control socketpair as
inherited fds. It imports everything it needs, reads its settings from the
launcher, sandboxes itself (broker.launch.sandbox), and only then serves.
"""

# isort: off
import broker.launch.sonames  # first: library lookups without running ldconfig

# isort: on
import argparse
import functools

# Import everything first: after the sandbox, nothing may be loaded from disk.
import gc  # noqa: F401
import importlib
import json  # noqa: F401
import logging
import mmap  # noqa: F401
import os
import pkgutil
import resource  # noqa: F401
import socket
import sys
import termios  # noqa: F401

import trio

import broker
import broker.io.fuse
from broker.access.config_settings import settings_from_message
from broker.access.selinux import make_mediator
from broker.activation.catalog import ServiceCatalog, catalog_from_json
from broker.bus.settings import BusSettings
from broker.io import control
from broker.io.server import serve, take_over_listener
from broker.launch import sandbox
from broker.launch.logs import setup_logging

try:  # loaded now, before the sandbox: it looks up libseccomp (see broker.launch.sonames)
    sandbox.seccomp_module()
except ImportError:
    pass  # no binding at all: apply_seccomp says so, and refuses to start where the config requires it

log = logging.getLogger("sealbus.broker")

# Every module of the broker package, so that no lazy import needs the filesystem later
# (Landlock allows no file access; a late import would fail).
_SKIP = ("broker.launch.launcher", "broker.access.selinux_audit", "broker.client")
for _m in pkgutil.walk_packages(broker.__path__, "broker."):
    if not _m.name.startswith(_SKIP):
        importlib.import_module(_m.name)


def selinux_mediator(settings: BusSettings, ctl):
    """SELinux mediation when the launcher says SELinux is enabled; denials go back to it for auditing."""
    if not settings.selinux:
        return None

    def to_launcher(text: str) -> None:
        control.send_msg(ctl, {"type": "audit", "text": text})

    mediator = make_mediator(settings.selinux_associations, to_launcher)
    if mediator is None:
        raise SystemExit("the launcher saw SELinux enabled but the broker does not: refusing to run unmediated")
    return mediator


def launcher_catalog(msg: dict) -> ServiceCatalog:
    """The catalogue of activatable services the launcher read and sent beside the settings: the sandboxed
    broker may not read the service directories, and never tries (none sent: nothing to activate)."""
    return catalog_from_json(msg["catalog"]) if msg.get("catalog") is not None else ServiceCatalog()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="sealbus-broker", description="sealbus broker process (started by the launcher)")
    p.add_argument("--listen-fd", type=int, action="append", required=True, help="repeated: one per address")
    p.add_argument("--control-fd", type=int, required=True)
    p.add_argument("--fuse-fd", type=int, help="/dev/fuse fd of the payload fs the launcher mounted")
    p.add_argument("--store-fd", type=int, help="directory fd where the payload fs keeps its contents")
    p.add_argument("--log-level", default="info")
    a = p.parse_args(argv)
    setup_logging(a.log_level)
    import signal

    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads come from the launcher, over the control channel
    ctl = socket.socket(fileno=a.control_fd)
    listen_socks = [socket.socket(fileno=fd) for fd in a.listen_fd]
    for sock in listen_socks:  # clients then see this process (and the bus user) as the bus
        take_over_listener(sock)
    msg = control.recv_msg(ctl)
    settings = settings_from_message(msg)
    settings.catalog = launcher_catalog(msg)
    settings.mediator = selinux_mediator(settings, ctl)  # the AVC opens selinuxfs: before the sandbox
    sandbox.drop_privileges(msg["uid"], msg["gid"])
    if settings.payload_fs and (a.fuse_fd is None or a.store_fd is None):
        raise SystemExit("the launcher named a payload fs but passed no --fuse-fd and --store-fd")
    settings.payload_store_fd = a.store_fd
    landlock_on = sandbox.apply_landlock(settings.landlock == "required", selinuxfs=settings.mediator is not None,
                                         payload_fs=settings.payload_fs, payload_store_fd=a.store_fd)  # fmt: skip
    seccomp_on = sandbox.apply_seccomp(settings.seccomp == "required")
    log.info("broker sandboxed: uid=%d gid=%d landlock=%s seccomp=%s", os.getuid(), os.getgid(),
             landlock_on, seccomp_on)  # fmt: skip

    async def run():
        async with trio.open_nursery() as n:
            # serve reads the launcher's messages (control_loop) and asks it for reloads
            bus = await n.start(functools.partial(serve, settings, listen_socks, fuse_fd=a.fuse_fd, control=ctl))
            # connections queued before take_over_listener() carry the launcher's pid as their peer, so a
            # client passing its own bus connection through the bus is recognised by that pid too
            bus.payload.ctx.own_pids.add(os.getppid())
            control.send_msg(ctl, {"type": "ready", "pid": os.getpid(), "guid": bus.guid})

    try:
        trio.run(run)
    except SystemExit as e:
        log.info("stopping: %s", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
