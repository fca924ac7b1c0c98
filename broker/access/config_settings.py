"""BusSettings: built from a dbus-daemon XML config by one function, and carried to the broker.

``settings_from_config`` is the only place a config (or none: the embedded session
default) and command-line overrides become settings; every start path calls it.
``settings_to_message`` / ``settings_from_message`` carry the result over the
launcher's control channel (JSON), field by field, so a new BusSettings field
reaches the broker without anyone writing code for it (see broker.bus.settings).
"""

import logging
import os
from dataclasses import fields

from ..bus.limits import Limits, limits_for
from ..bus.settings import BusSettings, ServiceDir

# The XML parser and the policy compiler are imported where a config is read: the embedded default
# (`sealbus run` with no --config) starts without them (issue #18: start-up time).


def read_machine_id() -> str:
    for p in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(p) as f:
                v = f.read().strip()
            if len(v) == 32:
                return v
        except OSError:
            continue
    return ""


def apparmor_dbus_mediation(root: str = "/") -> bool:
    """Whether dbus-daemon would mediate with AppArmor here: AppArmor on, and a kernel that mediates D-Bus
    (its features/dbus/mask, as dbus-daemon's bus/apparmor.c looks for; Ubuntu's kernels, not Debian's)."""
    try:
        with open(os.path.join(root, "sys/module/apparmor/parameters/enabled")) as f:
            if f.read().strip() != "Y":
                return False
    except OSError:
        return False
    return os.path.exists(os.path.join(root, "sys/kernel/security/apparmor/features/dbus/mask"))


def _selinux_is_the_lsm() -> bool:
    """With SELinux enforcing policy, AppArmor is not the major LSM, so there is nothing to probe; and the
    probe (a sysfs read) is one the launcher's SELinux domain is not allowed, which the VM tier reports as
    an AVC denial."""
    from .selinux import selinux_enabled

    return selinux_enabled()


def check_apparmor(mode: str | None, *, warn: bool = True) -> None:
    """sealbus has no AppArmor mediation: refuse a config that requires it (dbus-daemon refuses to start when
    it cannot honour "required"), and warn where dbus-daemon would enforce the dbus rules of AppArmor profiles
    (mode "enabled", the default, on a kernel that mediates D-Bus)."""
    from .config import ConfigError

    if mode == "required":
        raise ConfigError('<apparmor mode="required"/>: sealbus has no AppArmor mediation; use mode="disabled" '
                          "(or remove the element) to run without it")  # fmt: skip
    if warn and mode != "disabled" and not _selinux_is_the_lsm() and apparmor_dbus_mediation():
        logging.getLogger("sealbus.config").warning(
            "AppArmor mediates D-Bus on this host, but sealbus does not: the dbus rules of AppArmor profiles are "
            'not enforced on this bus (dbus-daemon would enforce them); <apparmor mode="disabled"/> silences this'
        )


def settings_from_config(
    cfg=None, *, bus_type: str | None = None, owner_uid: int | None = None, **overrides
) -> BusSettings:
    """Settings from a parsed config (None: the embedded allow-all session default), then ``overrides``
    (command-line options, by field name; None values are ignored). ``bus_type``: the type when the
    config names none (``run --system``: "system"). ``owner_uid``: the uid the policy treats as the
    bus's own (default: this process's, as compiled)."""
    s = BusSettings() if cfg is None else _from_config(cfg, bus_type)
    if owner_uid is not None and s.policy is not None:
        s.policy.owner_uid = owner_uid
    names = {f.name for f in fields(BusSettings)}
    for name, value in overrides.items():
        if name not in names:
            raise TypeError(f"no bus setting named {name!r}")
        if value is not None:
            setattr(s, name, value)
    s.machine_id = s.machine_id or read_machine_id()
    return s


def _from_config(cfg, bus_type: str | None) -> BusSettings:
    check_apparmor(cfg.apparmor_mode)
    kind = cfg.type or bus_type
    s = BusSettings(bus_type=kind or "custom")
    s.limits = limits_for(kind, cfg.limits)
    s.policy = cfg.policy
    sb = cfg.sealbus
    for name in ("fd_mode", "payload_fs", "payload_timeout_ms", "payload_max_bytes_per_user", "busy_poll_us"):
        if getattr(sb, name) is not None:
            setattr(s, name, getattr(sb, name))
    s.landlock, s.seccomp = sb.landlock, sb.seccomp
    s.servicedirs = list(cfg.servicedirs)
    s.auth = tuple(cfg.auth) or ("EXTERNAL",)
    from .selinux import selinux_enabled  # the embedded default (no config) is never mediated

    s.selinux = selinux_enabled()
    s.selinux_associations = dict(cfg.selinux_associations)
    s.config = cfg
    return s


def settings_from_file(path: str, **overrides) -> tuple[BusSettings, list[str]]:
    from .config import ConfigError, load_config

    cfg = load_config(path)
    if cfg.auth and "EXTERNAL" not in cfg.auth:
        raise ConfigError(f"{path}: sealbus only offers EXTERNAL authentication; the config allows {cfg.auth}")
    return settings_from_config(cfg, **overrides), list(cfg.listen)


def _policy(text: str):
    from .policy import Policy

    return Policy.from_json(text)


def _limits(values: dict) -> Limits:
    lim = Limits()
    lim.update(values)
    return lim


def _servicedirs(values: list) -> list[ServiceDir]:
    return [ServiceDir(str(path), bool(strict), bool(watch)) for path, strict, watch in values]


# Fields whose values are not JSON-native: (to JSON, from JSON).
CODECS = {
    "limits": (lambda lim: dict(vars(lim)), _limits),
    "policy": (lambda p: None if p is None else p.to_json(), lambda j: None if j is None else _policy(j)),
    "auth": (list, tuple),
    "servicedirs": (lambda dirs: [[d.path, d.strict_naming, d.watch] for d in dirs], _servicedirs),
}
# What the launcher sends beside the settings: the message kind, whom to become, and the catalogue of
# activatable services it read for the broker (which may not read the service directories): JSON as in a
# ``reload`` message (broker.activation.catalog.catalog_to_json), BusSettings.catalog (LOCAL) in the broker.
ENVELOPE = ("type", "uid", "gid", "catalog")


def settings_to_message(s: BusSettings, **envelope) -> dict:
    """The control-channel message carrying ``s`` (every field not marked LOCAL), plus ``envelope``."""
    msg = {"type": "settings", **envelope}
    for f in fields(s):
        if f.metadata.get("local"):
            continue
        value = getattr(s, f.name)
        msg[f.name] = CODECS[f.name][0](value) if f.name in CODECS else value
    return msg


def settings_from_message(msg: dict) -> BusSettings:
    """The settings a launcher sent; an unknown field (a launcher newer than this broker) is an error."""
    known = {f.name: f for f in fields(BusSettings) if not f.metadata.get("local")}
    unknown = set(msg) - set(known) - set(ENVELOPE)
    if unknown:
        raise ValueError(f"settings from the launcher name unknown fields: {sorted(unknown)}")
    s = BusSettings()
    for name, value in msg.items():
        if name in known:
            setattr(s, name, CODECS[name][1](value) if name in CODECS else value)
    return s
