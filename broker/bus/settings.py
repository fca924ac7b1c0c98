"""What a running bus needs to know, independent of where it came from
(the command line, a dbus-daemon XML config, or the launcher's hand-off)."""

from dataclasses import dataclass, field

from .limits import Limits, session_limits


@dataclass(frozen=True)
class ServiceDir:
    """A directory of activatable service files, with dbus-daemon's flags for it."""

    path: str
    strict_naming: bool = False  # files must be named Name + ".service" (dbus-daemon's transient session dir)
    watch: bool = True  # watched for changes (inotify); dbus-daemon does not watch the transient dir


@dataclass
class BusSettings:
    bus_type: str = "session"
    limits: Limits = field(default_factory=session_limits)
    fd_mode: str = "any"  # any | sealed | none
    policy: object = None  # None: allow everything (the embedded session default)
    selinux: object = None  # broker.access.selinux.SELinuxMediator when SELinux is enabled
    payload_fs: str | None = None  # mount point of the FUSE payload filesystem
    payload_timeout_ms: int = 30000
    payload_max_bytes_per_user: int = 256 * 1024 * 1024
    auth: tuple[str, ...] = ("EXTERNAL",)
    machine_id: str = ""
    servicedirs: list[ServiceDir] = field(default_factory=list)  # in config order, standard ones expanded
    catalog: object = None  # broker.activation.catalog.ServiceCatalog from the launcher; None: read servicedirs
    busy_poll_us: int = 50  # longest adaptive poll before the reactor sleeps (0: never poll); see broker.io.busy_poll
    extra: dict = field(default_factory=dict)
