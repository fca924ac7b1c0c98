"""What a running bus needs to know, independent of where it came from.

One object, built by one function (``broker.access.config_settings.settings_from_config``:
config + command-line overrides), whichever way the bus starts: ``sealbus run``,
``run --config``, ``run --system``, the dbus-daemon drop-in, with or without the
launcher. The launcher sends it to the broker over the control channel
(``settings_to_message`` / ``settings_from_message``, same module), so both
processes hold the same settings.

To add a setting: add a field here with a JSON-native type (str, int, bool,
None, or a dict/list of those) and a default, and set it in ``settings_from_config``
(from the config) or pass it as an override. It then travels to the broker by
itself. A field holding anything else needs a codec in
``config_settings.CODECS``; a field that must stay in the process that built it
(a live object) is declared with ``metadata=LOCAL``. tests/test_settings_paths.py
fails for a field that does not survive the trip.
"""

from dataclasses import dataclass, field

from .limits import Limits, session_limits

LOCAL = {"local": True}  # field metadata: never sent to the broker (a live object of this process)


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
    policy: object = None  # the config's compiled broker.access.policy.Policy; None: allow everything
    selinux: bool = False  # mediate with SELinux (decided where the config is read: the launcher, as root)
    selinux_associations: dict[str, str] = field(default_factory=dict)  # <associate own= context=>
    payload_fs: str | None = None  # mount point of the FUSE payload filesystem
    payload_timeout_ms: int = 30000
    payload_max_bytes_per_user: int = 256 * 1024 * 1024
    auth: tuple[str, ...] = ("EXTERNAL",)
    machine_id: str = ""
    servicedirs: list[ServiceDir] = field(default_factory=list)  # in config order, standard ones expanded
    busy_poll_us: int = 50  # longest adaptive poll before the reactor sleeps (0: never poll); see broker.io.busy_poll
    systemd_activation: bool = False  # dbus-daemon --systemd-activation (announced in Features)
    landlock: str = "best-effort"  # the broker's sandbox, when started by the launcher: required | best-effort
    seccomp: str = "best-effort"
    # process-local: the SELinux mediator (built before the broker sandboxes itself, with its audit sink)
    mediator: object = field(default=None, metadata=LOCAL)
    # process-local: the broker.activation.catalog.ServiceCatalog (None: the bus reads servicedirs itself); a
    # launcher's broker gets the one the launcher read beside its settings (config_settings.ENVELOPE)
    catalog: object = field(default=None, metadata=LOCAL)
    # process-local: directory (fd) for the payload fs's contents (the broker's --store-fd); None: a private one
    payload_store_fd: int | None = field(default=None, metadata=LOCAL)
    config: object = field(default=None, metadata=LOCAL)  # the parsed XML config: the command line, reloads
    extra: dict = field(default_factory=dict, metadata=LOCAL)  # process-local odds and ends: never sent
