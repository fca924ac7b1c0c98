"""Where activatable service files live: dbus-daemon 1.14's standard service directories.

``<standard_session_servicedirs/>`` and ``<standard_system_servicedirs/>`` are
expanded when the config is parsed (as dbus-daemon does, from the environment
of the process that reads the config), into ``ServiceDir``s kept in config
order, each directory once (a repeated one keeps its first place, and keeps a
flag only if every mention sets it, as dbus-daemon merges them).
"""

import logging
import os

from ..bus.settings import ServiceDir

log = logging.getLogger("sealbus.config")

SESSION_SUBDIR = "dbus-1/services"
SYSTEM_SUBDIR = "dbus-1/system-services"
DATADIR = "/usr/share"  # dbus-daemon's configured DBUS_DATADIR on Debian and Fedora
# dbus-daemon 1.14: /usr/local/share, /usr/share, DATADIR, and /lib for early boot without /usr
SYSTEM_BASES = ("/usr/local/share", "/usr/share", DATADIR, "/lib")


def standard_system_servicedirs() -> list[ServiceDir]:
    return [ServiceDir(os.path.join(base, SYSTEM_SUBDIR)) for base in SYSTEM_BASES]


def set_up_transient_dir(runtime: str) -> str | None:
    """Create $XDG_RUNTIME_DIR/dbus-1/services as dbus-daemon does (where tools such as systemd drop
    transient services), only in a runtime directory private to this user; its path, or None (logged)."""
    try:
        st = os.stat(runtime)
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise OSError(f"{runtime} is not private to uid {os.getuid()}")
        path = runtime
        for part in SESSION_SUBDIR.split("/"):
            path = os.path.join(path, part)
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
        return path
    except OSError as e:
        log.warning("no transient service directory: %s", e)
        return None


def standard_session_servicedirs(env=None, *, create: bool = False) -> list[ServiceDir]:
    """$XDG_RUNTIME_DIR/dbus-1/services (transient: strict naming, not watched; ``create``: made if
    missing, as dbus-daemon does), $XDG_DATA_HOME, each of $XDG_DATA_DIRS, then DATADIR, each with
    /dbus-1/services: dbus-daemon's order and defaults."""
    env = os.environ if env is None else env
    dirs = []
    runtime = env.get("XDG_RUNTIME_DIR")
    transient = (
        (set_up_transient_dir(runtime) if create else os.path.join(runtime, SESSION_SUBDIR)) if runtime else None
    )
    if transient:
        dirs.append(ServiceDir(transient, strict_naming=True, watch=False))
    data_home = env.get("XDG_DATA_HOME") or (os.path.join(env["HOME"], ".local/share") if env.get("HOME") else None)
    bases = [data_home] if data_home else []
    data_dirs = env.get("XDG_DATA_DIRS")
    bases += data_dirs.split(":") if data_dirs else ["/usr/local/share", "/usr/share"]
    bases.append(DATADIR)
    dirs += [ServiceDir(os.path.join(b, SESSION_SUBDIR)) for b in bases if b]
    return dirs


def add_unique(dirs: list[ServiceDir], new: list[ServiceDir]) -> None:
    """Append each of ``new`` not in ``dirs`` yet; a repeated one keeps its place and the flags both share."""
    where = {d.path: i for i, d in enumerate(dirs)}
    for d in new:
        i = where.get(d.path)
        if i is None:
            where[d.path] = len(dirs)
            dirs.append(d)
        else:
            old = dirs[i]
            dirs[i] = ServiceDir(d.path, old.strict_naming and d.strict_naming, old.watch or d.watch)
