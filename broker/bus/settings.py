"""What a running bus needs to know, independent of where it came from
(the command line, a dbus-daemon XML config, or the launcher's hand-off)."""

from dataclasses import dataclass, field

from .limits import Limits, session_limits


@dataclass
class BusSettings:
    bus_type: str = "session"
    limits: Limits = field(default_factory=session_limits)
    fd_mode: str = "any"  # any | sealed | none
    policy: object = None  # None: allow everything (the embedded session default)
    selinux: object = None  # broker.access.selinux.SELinuxMediator when SELinux is enabled
    payload_fs: str | None = None  # mount point of the FUSE payload filesystem
    payload_store_fd: int | None = None  # directory (fd) for its contents; None: a private one made at start
    payload_timeout_ms: int = 30000
    payload_max_bytes_per_user: int = 256 * 1024 * 1024
    auth: tuple[str, ...] = ("EXTERNAL",)
    machine_id: str = ""
    busy_poll_us: int = 50  # longest adaptive poll before the reactor sleeps (0: never poll); see broker.io.busy_poll
    extra: dict = field(default_factory=dict)
