"""Reloading the configuration, its policy, its limits and the catalogue of activatable services, without
dropping a connection: on ReloadConfig, SIGHUP, and a change inotify reports in a watched directory.

Who reads: the process that may. A bus without a launcher (``sealbus run``, ``sealbus dbus-daemon`` as a
user) reads the config and the service directories itself, in a worker thread, so the event loop never
waits on the file system. A sandboxed broker (``run --system``, ``dbus-daemon`` as root with ``<user>``)
cannot read /etc and never tries: it asks the launcher over the control channel (``reload-request``), and
the launcher, which also watches the directories and takes SIGHUP, re-reads everything and sends the
result (``reload``: compiled policy, limits and catalogue, or the error). See docs/architecture.md.

Requests are coalesced: at most one reload runs at a time; every request that arrives while one runs is
served by one more pass after it (so each caller sees files at least as new as its request), and its
caller is answered then. A flood of ReloadConfig calls or inotify events therefore costs at most one
reload at a time, and the callers waiting are bounded (``MAX_WAITERS``; past it: LimitsExceeded).
A config that fails to load changes nothing: the old policy, limits and catalogue stay, ReloadConfig callers get
``org.freedesktop.DBus.Error.Failed`` with the reason (as dbus-daemon), SIGHUP and inotify log it.
"""

import logging
import os
from dataclasses import dataclass, field

import trio

from ..access.config import load_config
from ..access.config_settings import check_apparmor
from ..access.mediator import BusPolicy
from ..activation.catalog import ServiceCatalog, catalog_from_json, load_catalog
from ..bus.limits import limits_for
from . import control
from .inotify import DirWatcher

log = logging.getLogger("sealbus.reload")

MAX_WAITERS = 1024  # ReloadConfig calls waiting for the reload in progress (then LimitsExceeded)
SETTLE_SECONDS = 0.1  # after a change is seen, wait this long for the rest of it (an editor's or a package's)
LAUNCHER_TIMEOUT = 60.0  # a launcher that does not answer a reload request within this fails the request


class ReloadFailed(Exception):
    """The new configuration could not be loaded; the old one stays."""


@dataclass
class Loaded:
    """What a reload installs."""

    policy: object  # broker.access.policy.Policy, or None (allow-all)
    catalog: ServiceCatalog
    watch: list[str] = field(default_factory=list)  # directories whose changes mean "reload"
    config: object = None  # the BusConfig (None when it came from the launcher)
    limits: dict | None = None  # every <limit>, by name (limits_for: the config's over the defaults)


def watch_paths(cfg) -> list[str]:
    """The directories dbus-daemon would watch: each config file's, each <includedir>, each service dir."""
    dirs = [os.path.dirname(f) for f in cfg.files] + list(cfg.includedirs)
    dirs += [d.path for d in cfg.servicedirs if d.watch]
    return list(dict.fromkeys(dirs))


def read_config(path: str, default_type: str) -> Loaded:
    """Load ``path`` and its service directories (blocking: the launcher, or a worker thread)."""
    try:
        cfg = load_config(path)
        check_apparmor(cfg.apparmor_mode, warn=False)  # said once, at start-up
    except Exception as e:  # ConfigError, and anything policy compilation raises: the old config stays
        raise ReloadFailed(str(e)) from None
    bus_type = cfg.type or default_type
    catalog = load_catalog(cfg.servicedirs, system_bus=bus_type == "system")
    return Loaded(cfg.policy, catalog, watch_paths(cfg), cfg, vars(limits_for(bus_type, cfg.limits)))


def install_policy(bus, xml_policy) -> None:
    """Make ``xml_policy`` (a compiled Policy or None) the bus's, keeping its SELinux mediation."""
    if bus.policy is not None and bus.policy.selinux is not None:
        bus.policy = bus.policy.with_xml(xml_policy)
    else:
        bus.policy = BusPolicy(xml_policy) if xml_policy is not None else None


def loaded_from_message(msg: dict) -> Loaded:
    """The launcher's ``reload`` message as a Loaded (ReloadFailed if it reports a failure)."""
    from ..access.policy import Policy

    if msg.get("ok") is False:
        raise ReloadFailed(str(msg.get("error") or "the launcher could not reload the configuration"))
    policy = Policy.from_json(msg["policy"]) if msg.get("policy") else None
    catalog = catalog_from_json(msg["catalog"]) if msg.get("catalog") is not None else None
    limits = msg.get("limits")
    if limits is not None and not isinstance(limits, dict):
        raise ValueError("limits must be an object")
    return Loaded(policy, catalog, limits=limits)


def install(bus, loaded: Loaded) -> None:
    if loaded.limits is not None and bus.server is not None:
        bus.server.apply_limits(loaded.limits)  # first: an unknown limit name refuses the whole reload
    install_policy(bus, loaded.policy)
    if loaded.catalog is not None:
        bus.catalog = loaded.catalog
    log.info("configuration reloaded: %d activatable service(s)", len(bus.catalog or ()))


class Reloader:
    """Runs reloads one at a time for the bus, answering the ReloadConfig callers waiting on each."""

    def __init__(self, bus, config_path: str | None, default_type: str, launcher=None):
        self.bus = bus
        self.config_path = config_path
        self.default_type = default_type
        self.launcher = launcher  # the control socket when the launcher reads for us
        self.waiters: list[tuple[object, int]] = []  # (peer, serial) of ReloadConfig calls to answer
        self.wanted = trio.Event()
        self.watcher: DirWatcher | None = None
        self._asked = 0  # id of the last reload-request sent to the launcher
        self._answer: dict | None = None
        self._answered = trio.Event()
        self.passes = 0  # reloads done (for tests and stats)

    # -- requests ---------------------------------------------------------

    def request(self, peer=None, serial: int | None = None) -> None:
        """Ask for a reload; ``peer``/``serial``: a ReloadConfig call to answer once it is done."""
        if peer is not None and serial is not None:
            if len(self.waiters) >= MAX_WAITERS:
                self.bus.send_error(peer, serial, "org.freedesktop.DBus.Error.LimitsExceeded",
                                    "too many ReloadConfig calls are waiting for the reload in progress")  # fmt: skip
                return
            self.waiters.append((peer, serial))
        self.wanted.set()

    def driver_hook(self, peer, serial: int | None) -> None:
        """Bus.reload_hook: ReloadConfig (serial None: the caller wants no reply)."""
        self.request(peer, serial)

    def on_launcher_message(self, msg: dict) -> None:
        """A ``reload`` from the launcher: the answer we wait for, or one it made on its own (SIGHUP, inotify)."""
        if msg.get("id") is not None and msg.get("id") == self._asked:
            self._answer = msg
            self._answered.set()
            return
        try:
            install(self.bus, loaded_from_message(msg))
        except (ReloadFailed, ValueError, KeyError, TypeError) as e:
            log.warning("the launcher's reload was not applied: %s", e)

    # -- the loop ---------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self.wanted.wait()
            self.wanted = trio.Event()
            waiters, self.waiters = self.waiters, []
            error = None
            try:
                loaded = await self._load()
                if loaded is not None:
                    install(self.bus, loaded)
                    if self.watcher is not None and loaded.watch:
                        self.watcher.set_paths(loaded.watch)
            except ReloadFailed as e:
                error = str(e)
                log.error("reload failed, keeping the old configuration: %s", error)
            except Exception as e:  # a reload must never take the bus down with it
                error = f"internal error while reloading: {e!r}"
                log.exception("reload failed, keeping the old configuration")
            self.passes += 1
            self._answer_waiters(waiters, error)

    async def _load(self) -> Loaded | None:
        if self.launcher is not None:
            return await self._ask_launcher()
        if self.config_path is None:
            return None  # the built-in configuration: nothing to re-read
        return await trio.to_thread.run_sync(read_config, self.config_path, self.default_type)

    async def _ask_launcher(self) -> Loaded:
        self._asked += 1
        self._answer, self._answered = None, trio.Event()
        control.send_msg(self.launcher, {"type": "reload-request", "id": self._asked})
        with trio.move_on_after(LAUNCHER_TIMEOUT):
            await self._answered.wait()
        if self._answer is None:
            raise ReloadFailed("the launcher did not answer the reload request")
        try:
            return loaded_from_message(self._answer)
        except (ValueError, KeyError, TypeError) as e:
            raise ReloadFailed(f"malformed reload from the launcher: {e}") from None

    def _answer_waiters(self, waiters, error: str | None) -> None:
        bus = self.bus
        for peer, serial in waiters:
            if error is None:
                bus.send_reply(peer, serial)
            else:
                bus.send_error(peer, serial, "org.freedesktop.DBus.Error.Failed", error)
        if waiters and bus.server is not None:
            bus.server.flush_dirty()

    async def watch(self, watcher: DirWatcher) -> None:
        """Reload when a directory ``watcher`` watches changes (it is set up before the first read, so no
        change falls between the two); each reload then points it at the new config's directories."""
        self.watcher = watcher
        try:
            while True:
                await trio.lowlevel.wait_readable(watcher.fileno())
                await trio.sleep(SETTLE_SECONDS)  # the rest of the change (many files, a rename)
                if watcher.drain():
                    self.request()
        finally:
            watcher.close()


def open_watcher(paths) -> DirWatcher | None:
    """A DirWatcher on ``paths``, or None (logged) where inotify is not available."""
    try:
        watcher = DirWatcher()
    except OSError as e:
        log.warning("no inotify (%s): service files are re-read on ReloadConfig and SIGHUP only", e)
        return None
    watcher.set_paths(paths)
    return watcher
