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

from ..access.config import load_config
from ..access.selinux import USER_AVC_FORM, AuditLimiter, selinux_enabled
from ..bus.limits import Limits
from ..io.address import listen, systemd_listeners
from . import control
from .audit import AuditWriter

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
        return [BROKER_ENTRY]
    return [sys.executable, "-m", "broker.launch.broker", "--log-level", log_level]


def check_selinux_domain(cmd: list[str]) -> None:
    """In enforcing mode, refuse to start a broker that would not run in sealbus_t."""
    try:
        import selinux
    except ImportError:
        return
    if selinux.is_selinux_enabled() != 1 or selinux.security_getenforce() != 1:
        return
    _, me = selinux.getcon()
    _, exec_ctx = selinux.getfilecon(cmd[0])
    _, new = selinux.security_compute_create(me, exec_ctx, selinux.string_to_security_class("process"))
    if new.split(":")[2] != BROKER_DOMAIN:
        raise SystemExit(f"sealbus: enforcing mode, and the broker would run in {new}, not {BROKER_DOMAIN}: "
                         f"install the policy module and {BROKER_ENTRY} (labelled sealbus_exec_t)")  # fmt: skip


def broker_settings(cfg, user: pwd.struct_passwd) -> dict:
    lim = Limits()
    lim.update(cfg.limits)
    return {
        "type": "settings", "bus_type": cfg.type or "system", "limits": vars(lim),
        "fd_mode": cfg.sealbus.fd_mode or "any",
        "policy": cfg.policy.to_json() if cfg.policy is not None else None,
        "uid": user.pw_uid, "gid": user.pw_gid,
        "landlock": cfg.sealbus.landlock, "seccomp": cfg.sealbus.seccomp,
        "machine_id": _machine_id(),
        "selinux": selinux_enabled(), "selinux_associations": cfg.selinux_associations,
    }  # fmt: skip


def _machine_id() -> str:
    try:
        with open("/etc/machine-id") as f:
            return f.read().strip()
    except OSError:
        return ""


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
    os.makedirs(runtime, mode=0o755, exist_ok=True)
    os.chmod(runtime, 0o755)  # before chown: afterwards it would need CAP_FSETID
    os.chown(runtime, user.pw_uid, user.pw_gid)
    activated = systemd_listeners()  # sealbus.socket, when socket-activated
    if activated:
        listener = activated[0]
    else:
        address = args.address or f"unix:path={os.path.join(runtime, 'system_bus_socket')}"
        listener = listen(address, socket_mode=0o666)
    ctl_launcher, ctl_broker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    cmd = broker_command(args.log_level)
    check_selinux_domain(cmd)
    fds = (listener.sock.fileno(), ctl_broker.fileno())
    cmd += ["--listen-fd", str(fds[0]), "--control-fd", str(fds[1])]
    proc = subprocess.Popen(cmd, pass_fds=fds, stdin=subprocess.DEVNULL)
    ctl_broker.close()
    stop = {"sig": None}

    def on_signal(signum, frame):
        stop["sig"] = signum

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)
    try:
        control.send_msg(ctl_launcher, broker_settings(cfg, user))
        ready = control.recv_msg(ctl_launcher)
        if ready.get("type") != "ready":
            raise RuntimeError(f"unexpected message from the broker: {ready}")
        log.info("broker pid %d ready on %s", proc.pid, listener.address)
        print(listener.address, flush=True)
        sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=broker pid {proc.pid}")
        return supervise(proc, ctl_launcher, config_path, user, stop)
    except (EOFError, OSError, RuntimeError) as e:
        log.error("broker failed to start: %s", e)
        return 1
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        ctl_launcher.close()
        listener.close()


def supervise(proc, ctl, config_path: str, user, stop: dict) -> int:
    audit, limiter = AuditWriter(), AuditLimiter()
    inbox = control.Inbox(ctl)
    while True:
        if stop["sig"] == signal.SIGHUP:
            stop["sig"] = None
            try:
                cfg = load_config(config_path)
                control.send_msg(ctl, {"type": "reload", "policy": cfg.policy.to_json() if cfg.policy else None})
                log.info("configuration reloaded from %s and handed to the broker", config_path)
            except Exception as e:
                log.error("reload failed, keeping the old policy: %s", e)
        elif stop["sig"] is not None:
            log.info("stopping on %s", signal.Signals(stop["sig"]).name)
            proc.terminate()
            proc.wait(timeout=10)
            return 0
        rc = proc.poll()
        if rc is not None:
            log.error("the broker (pid %d) exited unexpectedly with status %s", proc.pid, rc)
            return 1
        try:
            readable, _, _ = select.select([ctl], [], [], 0.2)
        except InterruptedError:
            continue
        if readable:
            try:
                msgs = inbox.read()
            except EOFError:
                msgs = []  # the broker is gone: proc.poll() reports it on the next round
            for msg in msgs:
                # a broker SELinux denial (we hold CAP_AUDIT_WRITE); a compromised broker must not be able
                # to forge other kinds of records or flood the audit log
                text = str(msg.get("text", ""))
                if msg.get("type") == "audit" and USER_AVC_FORM.fullmatch(text) and limiter.take():
                    audit(text)
