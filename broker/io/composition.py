"""The composition root: settings in, a Bus with its policy, SELinux mediator, activation and payload layer out.

Every start path (``sealbus run``, the dbus-daemon drop-in, the broker behind the
launcher) builds its bus here from one BusSettings (broker.bus.settings); the
core receives what it needs of the process (its credentials, the fd budget)
from here rather than reading it itself. broker.io.server keeps the accept loop.
"""

import logging

from ..bus.router import Bus
from ..bus.settings import BusSettings
from .creds import own_creds

log = logging.getLogger("sealbus.server")


def fd_pool(soft: int) -> int:
    """The fds users may make the broker hold (FdQuota); the rest is the broker's own reserve."""
    return max(64, soft - max(64, soft // 8))


def raise_fd_limit(limits) -> int:
    """Raise RLIMIT_NOFILE to its hard limit and keep fd quotas below it.

    Running out of fds would stop the bus from accepting anyone: users share
    ``fd_pool(soft)`` fairly (FdQuota), an eighth of the limit (at least 64)
    stays with the broker, and a client can never make the broker exceed
    the limit by itself.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    limits.max_outgoing_unix_fds = min(limits.max_outgoing_unix_fds, max(64, soft // 4))
    return soft


def bus_policy(xml, mediator):
    """The policy object the core consults: the config's XML policy and, when on, SELinux (None: allow all)."""
    if mediator is None and xml is None:
        return None
    from ..access.mediator import BusPolicy

    return BusPolicy(xml, mediator)


def make_bus(settings: BusSettings) -> Bus:
    soft = raise_fd_limit(settings.limits)
    if settings.selinux and settings.mediator is None:
        from ..access.audit import AuditWriter
        from ..access.selinux import make_mediator

        settings.mediator = make_mediator(settings.selinux_associations, AuditWriter())
    machine_id = settings.machine_id
    if not machine_id:  # settings built by hand (tests): settings_from_config reads it
        from ..access.config_settings import read_machine_id

        machine_id = read_machine_id()
    bus = Bus(settings.limits, machine_id=machine_id, own=own_creds())
    bus.fd_quota.pool = fd_pool(soft)
    bus.policy = bus_policy(settings.policy, settings.mediator)
    bus.bus_type = settings.bus_type
    bus.catalog = settings.catalog
    if bus.catalog is None:  # no launcher read it for us: read the service directories (before serving)
        from ..activation.catalog import load_catalog

        bus.catalog = load_catalog(settings.servicedirs, system_bus=settings.bus_type == "system")
    if settings.systemd_activation:
        bus.features.append("SystemdActivation")  # dbus-daemon --systemd-activation
        bus.activator.systemd = True
    from .activation import inherited_environment

    bus.activator.base_env = inherited_environment()
    if settings.mediator is not None:
        bus.features.append("SELinux")  # as dbus-daemon when it mediates with SELinux
        log.info("SELinux mediation on (bus label %s)", settings.mediator.bus_label)
    from ..payload.bus_glue import install_fd_vetting

    install_fd_vetting(bus, settings)
    return bus


def apply_control(bus: Bus, msg: dict) -> None:
    """A message from the launcher: a reload (asked for by us, or its own on SIGHUP or inotify: policy,
    limits and catalogue, keeping the SELinux mediation), or how a service start it was asked for went."""
    kind = msg.get("type")
    if kind == "start_result":
        from .activation import apply_start_result

        apply_start_result(bus, msg)
    elif kind == "reload":
        if bus.reloader is not None:
            bus.reloader.on_launcher_message(msg)
            return
        from .reload import ReloadFailed, install, loaded_from_message  # a bus serve() did not start

        try:
            install(bus, loaded_from_message(msg))
        except (ReloadFailed, ValueError, KeyError, TypeError) as e:
            log.warning("the launcher's reload was not applied: %s", e)
