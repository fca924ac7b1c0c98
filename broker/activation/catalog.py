"""The catalogue of activatable services: every valid service file of the configured directories.

Built as dbus-daemon builds its activation entries: directories in config
order, ``*.service`` files only, the first file seen for a name wins (later
duplicates are logged and skipped), an invalid file is logged with its path
and reason and skipped, a missing or unreadable directory is skipped (it is
not an error: most standard directories do not exist on a given machine).
Within one directory files are taken in name order (dbus-daemon takes them in
readdir order, which is no order at all), so the winner of a duplicate is
deterministic. Bounded: at most ``MAX_FILES_PER_DIR`` files are looked at per
directory and ``MAX_SERVICES`` services kept, so a flood of files costs a
bounded amount of memory and time.
"""

import logging
import os

from ..bus.settings import ServiceDir
from .service_file import SUFFIX, ServiceFile, ServiceFileError, read_service_file

MAX_FILES_PER_DIR = 16384
MAX_SERVICES = 65536


class ServiceCatalog:
    """Activatable name -> ServiceFile; immutable once built (a reload builds a new one)."""

    def __init__(self, services: dict[str, ServiceFile] | None = None, dirs: tuple[ServiceDir, ...] = ()):
        self._services = dict(services or {})
        self.dirs = dirs

    def get(self, name: str) -> ServiceFile | None:
        return self._services.get(name)

    def names(self) -> list[str]:
        return sorted(self._services)

    def __len__(self) -> int:
        return len(self._services)

    def __contains__(self, name: str) -> bool:
        return name in self._services


def as_service_dir(d: "str | ServiceDir") -> ServiceDir:
    return d if isinstance(d, ServiceDir) else ServiceDir(d)


def service_file_names(path: str, log: logging.Logger | None = None) -> list[str]:
    """The ``*.service`` names in a directory, sorted, at most MAX_FILES_PER_DIR; [] if it cannot be read."""
    try:
        with os.scandir(path) as it:
            found = []
            for entry in it:
                if entry.name.endswith(SUFFIX):
                    found.append(entry.name)
                    if len(found) >= MAX_FILES_PER_DIR:
                        if log is not None:
                            log.warning("service directory %s: more than %d service files; the rest are ignored",
                                        path, MAX_FILES_PER_DIR)  # fmt: skip
                        break
    except OSError:
        return []  # missing or unreadable: skipped, as dbus-daemon does
    return sorted(found)


def load_catalog(dirs, *, system_bus: bool, log: logging.Logger | None = None) -> ServiceCatalog:
    """Read every directory of ``dirs`` (paths or ServiceDirs, in config order) into a catalogue."""
    log = log or logging.getLogger("sealbus.activation")
    sdirs = tuple(as_service_dir(d) for d in dirs)
    services: dict[str, ServiceFile] = {}
    for sdir in sdirs:
        for fname in service_file_names(sdir.path, log):
            path = os.path.join(sdir.path, fname)
            try:
                svc = read_service_file(path, system_bus=system_bus)
            except ServiceFileError as e:
                log.warning("invalid service file, skipped: %s", e)
                continue
            if sdir.strict_naming and fname != svc.name + SUFFIX:
                log.warning("service file %s should be named %s%s: not loading it", path, svc.name, SUFFIX)
                continue
            if svc.name in services:
                log.info("service file %s: %s is already provided by %s; skipped", path, svc.name,
                         services[svc.name].path)  # fmt: skip
                continue
            if len(services) >= MAX_SERVICES:
                log.warning("more than %d activatable services; %s and later files are ignored", MAX_SERVICES, path)
                return ServiceCatalog(services, sdirs)
            services[svc.name] = svc
    return ServiceCatalog(services, sdirs)


def catalog_to_json(catalog: ServiceCatalog) -> dict:
    """The catalogue as the launcher sends it to the broker (control channel, JSON)."""
    return {
        "dirs": [[d.path, d.strict_naming, d.watch] for d in catalog.dirs],
        "services": [[s.name, s.exec, s.user, s.systemd_service, s.path, s.assumed_apparmor_label]
                     for s in (catalog.get(n) for n in catalog.names())],
    }  # fmt: skip


def catalog_from_json(obj: dict) -> ServiceCatalog:
    """The inverse of catalog_to_json; a malformed object is a ValueError (the channel is then ended)."""
    try:
        dirs = tuple(ServiceDir(str(p), bool(strict), bool(watch)) for p, strict, watch in obj["dirs"])
        services = {}
        for name, exec_, user, unit, path, label in obj["services"][:MAX_SERVICES]:
            if not all(isinstance(v, str) for v in (name, exec_, path)):
                raise ValueError("service name, Exec and path must be strings")
            services[name] = ServiceFile(name, exec_, user, unit, path, label)
    except (KeyError, TypeError) as e:
        raise ValueError(f"malformed catalogue: {e}") from None
    return ServiceCatalog(services, dirs)
