"""`sealbus run --system`: the root launcher.

It does everything that needs privilege or the outside world: reads the
config and resolves users (NSS), creates the bus user and the runtime
directory, binds the socket, checks the SELinux domain the broker will get,
then starts the broker with only the fds it needs and supervises it: SIGHUP
reloads the policy without dropping connections, SIGTERM stops cleanly, a
crashed broker is logged and the launcher exits non-zero.
"""

import logging
import os
import pwd
import select
import signal
import socket
import subprocess
import sys
import time

from ..access.audit import AuditWriter
from ..access.config import load_config
from ..access.config_settings import settings_from_config, settings_to_message
from ..access.selinux import USER_AVC_FORM, AuditLimiter, selinux_enabled
from ..activation.catalog import catalog_to_json, load_catalog
from ..io import control
from ..io.address import listen, systemd_listeners
from ..io.inotify import DirWatcher
from ..io.reload import SETTLE_SECONDS, ReloadFailed, open_watcher, read_config, watch_paths
from ..payload.backing import LAUNCHER_STORE_NAME, make_store_dir, remove_store_dir
from . import sandbox
from .payload_mount import abort_payload_fs, launcher_payload_fs, unmount_payload_fs
from .service_start import ServiceSpawner

log = logging.getLogger("sealbus.launcher")

BUS_USER = "sealbus"
BROKER_ENTRY = "/usr/libexec/sealbus/sealbus-broker"
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "system.conf")
BROKER_DOMAIN = "sealbus_t"


def ensure_bus_user(name: str = BUS_USER) -> pwd.struct_passwd:
    """The bus user (sysusers.d creates it on packaged installs; useradd otherwise)."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", name], check=True)  # fmt: skip
        return pwd.getpwnam(name)


def broker_command(log_level: str) -> list[str]:
    if os.access(BROKER_ENTRY, os.X_OK):
        return [BROKER_ENTRY, "--log-level", log_level]  # an installed broker honours --log-level too
    return [sys.executable, "-m", "broker.launch.broker_process", "--log-level", log_level]


def check_selinux_domain(cmd: list[str]) -> None:
    """In enforcing mode, refuse to start a broker that would not run in sealbus_t.

    Reads /sys/fs/selinux/enforce and asks /sys/fs/selinux/create (the policy grants
    sealbus_launch_t both); a refusal here is a broken policy, reported as such, not a
    bare EACCES: nsswitch domains dontaudit selinuxfs, so the kernel logs nothing."""
    try:
        import selinux
    except ImportError:
        return
    if selinux.is_selinux_enabled() != 1:
        return
    try:
        if selinux.security_getenforce() != 1:
            return
        _, me = selinux.getcon()
        _, exec_ctx = selinux.getfilecon(cmd[0])
        _, new = selinux.security_compute_create(me, exec_ctx, selinux.string_to_security_class("process"))
    except OSError as e:
        raise SystemExit(f"sealbus: enforcing mode, and the launcher cannot ask the kernel which domain "
                         f"{cmd[0]} would run in ({e}): is the sealbus policy module loaded?") from None  # fmt: skip
    if new.split(":")[2] != BROKER_DOMAIN:
        raise SystemExit(f"sealbus: enforcing mode, and the broker would run in {new}, not {BROKER_DOMAIN}: "
                         f"install the policy module and {BROKER_ENTRY} (labelled sealbus_exec_t)")  # fmt: skip


def become_bus_user(uid: int, gid: int):
    """The broker child's last step before exec (a preexec_fn): drop root for good, here, in the
    launcher's domain. The broker's own domain (sealbus_t) holds no capability at all, not even the
    setuid/setgid/setpcap needed to drop them, so the broker must start as the bus user; the
    exec then enters sealbus_t with no_new_privs already set (policy: process2 nnp_transition)."""

    def drop() -> None:
        sandbox.drop_privileges(uid, gid)

    return drop


def policy_json(cfg, owner_uid: int | None = None) -> str | None:
    if cfg.policy is None:
        return None
    if owner_uid is not None:
        cfg.policy.owner_uid = owner_uid
    return cfg.policy.to_json()


def broker_settings(cfg, user: pwd.struct_passwd, owner_uid: int | None = None, payload_mount: str | None = None,
                    **overrides) -> dict:  # fmt: skip
    """The settings message for the broker: the one BusSettings every path builds (settings_from_config), whole,
    whom the broker must become and the services it may activate. ``payload_mount``: the payload fs this
    launcher mounted and passes as --fuse-fd (None: none served, whatever the config asked)."""
    settings = settings_from_config(cfg, bus_type="system", owner_uid=owner_uid, **overrides)
    settings.payload_fs = payload_mount
    # the launcher reads the service directories: the sandboxed broker may not (a reload sends it the same way)
    catalog = load_catalog(settings.servicedirs, system_bus=settings.bus_type == "system")
    return settings_to_message(settings, uid=user.pw_uid, gid=user.pw_gid, catalog=catalog_to_json(catalog))


def sd_notify(text: str) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(text.encode(), path)


def main_system(args) -> int:
    if os.geteuid() != 0:
        print("sealbus run --system: must be started as root (it drops to the bus user itself)", file=sys.stderr)
        return 1
    config_path = args.config or DEFAULT_CONFIG
    try:
        cfg = load_config(config_path)
    except Exception as e:
        print(f"sealbus run --system: {e}", file=sys.stderr)
        return 1
    user = ensure_bus_user()
    runtime = args.runtime_dir or "/run/sealbus"
    # root-owned, 0755: the broker creates nothing here (the launcher binds the socket and mounts
    # the payload fs), so the launcher needs neither chown nor CAP_FOWNER/CAP_DAC_OVERRIDE on it
    os.makedirs(runtime, mode=0o755, exist_ok=True)
    activated = systemd_listeners()  # sealbus.socket, when socket-activated
    if activated:
        listener = activated[0]
    else:
        address = args.address or f"unix:path={os.path.join(runtime, 'system_bus_socket')}"
        listener = listen(address, socket_mode=0o666)
    overrides = {}
    if getattr(args, "busy_poll", None) is not None:
        overrides["busy_poll_us"] = args.busy_poll
    if getattr(args, "systemd_activation", False):
        overrides["systemd_activation"] = True

    def announce(ready: dict) -> None:
        print(listener.address, flush=True)

    # the payload fs is always served: where asked, else the default place ("")
    payload_fs = getattr(args, "payload_fs", None) or cfg.sealbus.payload_fs or ""
    return serve_as_user(cfg, config_path, user, [listener], log_level=args.log_level, payload_fs=payload_fs,
                         runtime=runtime, announce=announce, overrides=overrides)  # fmt: skip


def serve_as_user(cfg, config_path: str, user: pwd.struct_passwd, listeners, *, log_level: str,  # noqa: C901
                  payload_fs: str | None, runtime: str | None, announce, overrides: dict | None = None,
                  owner_uid: int | None = None) -> int:  # fmt: skip
    """The launcher once its config, bus user and bound sockets are ready (`sealbus run --system`, and
    `sealbus dbus-daemon` started as root with a <user>): start the broker as ``user`` with only its fds
    (no capabilities, no_new_privs; it adds Landlock and seccomp), hand it its settings (``overrides``
    on top), call ``announce(ready message)`` once it serves, then supervise it until a signal.

    ``payload_fs``: a mount point, "" for the default place under ``runtime``, None for none.
    ``owner_uid``: the uid the policy treats as the bus's own (default: as compiled, the launcher's).
    Closes the listeners and unmounts the payload fs on the way out, whatever happens."""
    ctl_launcher, ctl_broker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc, payload_mount, watcher, store_dir = None, None, None, None
    stop = {"sig": None}

    def on_signal(signum, frame):
        stop["sig"] = signum

    # from the start: a SIGTERM while the broker starts must still end in the clean stop below
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)
    try:
        cmd = broker_command(log_level)
        check_selinux_domain(cmd)
        fds = (ctl_broker.fileno(), *(lst.sock.fileno() for lst in listeners))
        cmd += ["--control-fd", str(fds[0])]
        for fd in fds[1:]:
            cmd += ["--listen-fd", str(fd)]
        fuse_fd = None
        if payload_fs is not None:
            try:
                payload_mount, fuse_fd = launcher_payload_fs(payload_fs or None, runtime, user.pw_uid, user.pw_gid,
                                                             selinux_enabled())  # fmt: skip
            except OSError as e:
                log.error("payload fs not served: %s", e)  # the bus itself still runs: memfd payloads need no mount
        if fuse_fd is not None:
            # its contents: unlinked files in a directory of the bus user's own, not the broker's heap; in the
            # (root-owned) runtime dir under the name the SELinux policy types (sealbus_store_t)
            store_name = LAUNCHER_STORE_NAME if runtime else None
            store_dir, store_fd = make_store_dir(runtime, user.pw_gid, store_name)
            fds += (fuse_fd, store_fd)
            cmd += ["--fuse-fd", str(fuse_fd), "--store-fd", str(store_fd)]
        # preexec_fn: the launcher has no threads; the drop must happen here, in sealbus_launch_t
        proc = subprocess.Popen(
            cmd,
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            preexec_fn=become_bus_user(user.pw_uid, user.pw_gid),  # noqa: PLW1509
        )
        ctl_broker.close()
        if fuse_fd is not None:
            os.close(fuse_fd)  # the broker serves it; the mount stays until we unmount it on the way out
            os.close(store_fd)
        watcher = open_watcher(watch_paths(cfg))  # before the service directories are read: no change missed
        spawner = service_spawner(cfg, lambda msg: control.send_msg(ctl_launcher, msg))
        control.send_msg(ctl_launcher, broker_settings(cfg, user, owner_uid, payload_mount, **(overrides or {})))
        ready = wait_ready(proc, ctl_launcher, payload_mount, stop=stop)
        if ready.get("type") != "ready":
            raise RuntimeError(f"unexpected message from the broker: {ready}")
        spawner.address = f"{listeners[0].address},guid={ready.get('guid', '')}"
        log.info("broker pid %d ready on %s as uid %d", proc.pid, listeners[0].address, user.pw_uid)
        announce(ready)
        sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=broker pid {proc.pid}")
        return supervise(proc, ctl_launcher, config_path, user, stop, payload_mount, owner_uid, watcher, spawner)
    except (EOFError, OSError, RuntimeError) as e:
        log.error("broker failed to start: %s", e)
        return 1
    finally:
        if proc is not None:
            stop_broker(proc, payload_mount)
        ctl_launcher.close()
        ctl_broker.close()
        if watcher is not None:
            watcher.close()
        for lst in listeners:
            lst.close()
        if payload_mount is not None:
            unmount_payload_fs(payload_mount)
        if store_dir is not None:
            remove_store_dir(store_dir)  # empty: the broker's files there were never named


def broker_exiting(proc) -> bool:
    """Gone, or on its way out (its memory released: /proc/PID/cmdline reads empty)."""
    if proc.poll() is not None:
        return True
    try:
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            return not f.read(1)
    except OSError:
        return True


def wait_ready(proc, ctl, payload_mount: str | None, timeout: float = 60.0, stop: dict | None = None) -> dict:
    """The broker's first message, or RuntimeError if it dies or stays silent (or SIGTERM/SIGINT lands)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stop is not None and stop["sig"] in (signal.SIGTERM, signal.SIGINT):
            raise RuntimeError(f"stopped by {signal.Signals(stop['sig']).name} during start-up")
        readable, _, _ = select.select([ctl], [], [], 0.5)
        if readable:
            return control.recv_msg(ctl)
        if broker_exiting(proc):
            if payload_mount is not None:
                abort_payload_fs(payload_mount)  # it may be waiting on its own mount to finish dying
            raise RuntimeError(f"the broker exited during start-up (status {proc.wait(timeout=10)})")
    raise RuntimeError(f"the broker did not report ready within {timeout:.0f} s")


def stop_broker(proc, payload_mount: str | None) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            if payload_mount is not None:
                abort_payload_fs(payload_mount)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def service_spawner(cfg, send) -> ServiceSpawner:
    """Who starts services when the broker asks (by name; broker/launch/service_start.py)."""
    return ServiceSpawner(cfg.servicedirs, send, bus_type=cfg.type or "system")


def reload_for_broker(ctl, config_path: str, owner_uid: int | None, req_id: int | None,
                      watcher: DirWatcher | None, spawner: ServiceSpawner | None = None) -> None:  # fmt: skip
    """Re-read the config and the service directories and hand the result to the broker (``req_id``: the
    broker's reload-request this answers, None for our own on SIGHUP or inotify). A config that does not
    load changes nothing; the broker is told why only when it asked (it answers its ReloadConfig caller)."""
    try:
        loaded = read_config(config_path, "system")
    except ReloadFailed as e:
        log.error("reload failed, keeping the old configuration: %s", e)
        if req_id is not None:
            control.send_msg(ctl, {"type": "reload", "id": req_id, "ok": False, "error": str(e)})
        return
    if watcher is not None:
        watcher.set_paths(loaded.watch)
    if spawner is not None:  # starts look in the directories the broker's new catalogue came from
        spawner.dirs = loaded.config.servicedirs
    control.send_msg(ctl, {"type": "reload", "id": req_id, "ok": True, "policy": policy_json(loaded.config, owner_uid),
                           "catalog": catalog_to_json(loaded.catalog), "limits": loaded.limits})  # fmt: skip
    log.info("configuration reloaded from %s and handed to the broker (%d activatable services)", config_path,
             len(loaded.catalog))  # fmt: skip


def supervise(proc, ctl, config_path: str, user, stop: dict, payload_mount: str | None = None,
              owner_uid: int | None = None, watcher: DirWatcher | None = None,
              spawner: ServiceSpawner | None = None) -> int:  # fmt: skip
    """Until a signal stops the bus: reloads (SIGHUP, inotify, the broker's requests), audit records."""
    try:
        return _supervise(proc, ctl, config_path, stop, payload_mount, owner_uid, watcher, spawner)
    finally:
        if watcher is not None:
            watcher.close()


def _supervise(proc, ctl, config_path: str, stop: dict, payload_mount, owner_uid, watcher, spawner) -> int:  # noqa: C901
    audit, limiter = AuditWriter(), AuditLimiter()
    inbox = control.Inbox(ctl)
    changed_at = None  # when inotify last reported a change not reloaded yet
    while True:
        if stop["sig"] == signal.SIGHUP:
            stop["sig"] = None
            reload_for_broker(ctl, config_path, owner_uid, None, watcher, spawner)
        elif stop["sig"] is not None:
            log.info("stopping on %s", signal.Signals(stop["sig"]).name)
            stop_broker(proc, payload_mount)
            return 0
        if changed_at is not None and time.monotonic() - changed_at >= SETTLE_SECONDS:
            changed_at = None
            watcher.drain()
            reload_for_broker(ctl, config_path, owner_uid, None, watcher, spawner)
        if broker_exiting(proc):
            if payload_mount is not None:
                abort_payload_fs(payload_mount)  # lets a broker stuck on its own mount finish dying
            rc = proc.wait(timeout=30)
            log.error("the broker (pid %d) exited unexpectedly with status %s", proc.pid, rc)
            return 1
        if spawner is not None:
            spawner.reap()
        waiting_on = [ctl, watcher] if watcher is not None else [ctl]
        try:
            readable, _, _ = select.select(waiting_on, [], [], 0.2 if changed_at is None else SETTLE_SECONDS)
        except InterruptedError:
            continue
        if watcher is not None and watcher in readable and watcher.drain():
            changed_at = time.monotonic()
        if ctl in readable:
            try:
                msgs = inbox.read()
            except EOFError:
                msgs = []  # the broker is gone: proc.poll() reports it on the next round
            asked = None
            for msg in msgs:
                if msg.get("type") in ("start", "stop") and spawner is not None:
                    spawner.handle(msg)  # a name only: the launcher reads and checks the service file itself
                    continue
                # a broker SELinux denial (we hold CAP_AUDIT_WRITE); a compromised broker must not be able
                # to forge other kinds of records or flood the audit log
                text = str(msg.get("text", ""))
                if msg.get("type") == "audit" and USER_AVC_FORM.fullmatch(text) and limiter.take():
                    audit(text)
                elif msg.get("type") == "reload-request" and isinstance(msg.get("id"), int):
                    asked = msg["id"]  # requests read together are served by one reload (the last id)
            if asked is not None:
                reload_for_broker(ctl, config_path, owner_uid, asked, watcher, spawner)
