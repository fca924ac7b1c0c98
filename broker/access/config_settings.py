"""BusSettings from a dbus-daemon XML configuration file."""

from ..bus.limits import limits_for
from ..bus.settings import BusSettings
from .audit import AuditWriter
from .config import load_config
from .mediator import BusPolicy
from .selinux import make_mediator


def settings_from_config(cfg) -> BusSettings:
    s = BusSettings(bus_type=cfg.type or "custom")
    s.limits = limits_for(cfg.type, cfg.limits)
    s.policy = BusPolicy(cfg.policy) if cfg.policy is not None else None
    sb = cfg.sealbus
    if sb.fd_mode:
        s.fd_mode = sb.fd_mode
    if sb.payload_fs:
        s.payload_fs = sb.payload_fs
    if sb.payload_timeout_ms is not None:
        s.payload_timeout_ms = sb.payload_timeout_ms
    if sb.payload_max_bytes_per_user is not None:
        s.payload_max_bytes_per_user = sb.payload_max_bytes_per_user
    if sb.busy_poll_us is not None:
        s.busy_poll_us = sb.busy_poll_us
    s.servicedirs = list(cfg.servicedirs)
    s.auth = tuple(cfg.auth) or ("EXTERNAL",)
    s.selinux = make_mediator(cfg.selinux_associations, AuditWriter())
    s.extra["config"] = cfg
    return s


def settings_from_file(path: str) -> tuple[BusSettings, list[str]]:
    cfg = load_config(path)
    if cfg.auth and "EXTERNAL" not in cfg.auth:
        from .config import ConfigError

        raise ConfigError(f"{path}: sealbus only offers EXTERNAL authentication; the config allows {cfg.auth}")
    return settings_from_config(cfg), list(cfg.listen)
