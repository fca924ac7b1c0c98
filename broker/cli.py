"""The ``sealbus`` command.

Subcommands: ``run`` (a bus), ``dbus-daemon`` (drop-in for dbus-daemon's
command line), ``policy`` (explain / check / audit), ``send`` / ``receive`` /
``cat-payload`` (sealed payloads at a shell), ``bench``.
"""

import argparse
import contextlib
import logging
import os
import signal
import sys

from .launch import sonames  # noqa: F401  (before trio: its import-time find_library("pthread") runs ldconfig)
from .launch.logs import setup_logging

# trio and the bus are imported by the commands that serve a bus (policy, send, --help... need neither):
# start-up time is most of what a test harness starting a bus per test waits for (issue #18).

DESCRIPTION = """\
sealbus: a privilege-separated userspace D-Bus broker that carries sealed
memfd payloads (zero-copy unicast and multicast).

commands:
  run           start a bus (embedded session-style default; --system for the
                privilege-separated system bus, as root)
  dbus-daemon   the same bus behind dbus-daemon's command line
                (--config-file=F --nofork|--fork --print-address[=FD] ...)
  policy        explain | check | audit the bus and SELinux policy
  send          send a file as a sealed payload to a bus peer
  receive       receive sealed payloads and show them
  cat-payload   write a payload fd's contents to stdout
  bench         compare sealbus with dbus-daemon (and any running bus): round
                trips and sealed payloads (`make bench` in a source checkout
                runs the full benchmark, dbus-broker included)

`sealbus COMMAND --help` shows a command's options. A bad option, file or
address gets one line on stderr and a non-zero exit status (2: a bad command
line); Ctrl-C stops send/receive with status 130 and run cleanly (status 0).
"""


def load_settings(path: str | None, **overrides):
    """BusSettings from a dbus-daemon XML config (None: the embedded default) and command-line ``overrides``
    (by field name, None: not given), and the config's listen addresses."""
    from .access.config_settings import settings_from_config, settings_from_file

    if path:
        return settings_from_file(path, **overrides)
    return settings_from_config(None, **overrides), []


def serve_until_signal(settings, listeners, on_ready=None) -> None:
    """Run the bus (trio) until SIGINT/SIGTERM."""
    import trio

    trio.run(run_bus, settings, listeners, on_ready)


async def run_bus(settings, listeners, on_ready=None) -> None:
    """Serve until SIGINT/SIGTERM, then stop cleanly; SIGHUP reloads the configuration."""
    import trio

    from .io.server import serve

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as sigs:
        async with trio.open_nursery() as nursery:
            bus = await nursery.start(serve, settings, listeners)
            if on_ready is not None:
                on_ready(bus)
            async for signum in sigs:
                if signum == signal.SIGHUP:  # as dbus-daemon: reload the configuration
                    bus.reloader.request()
                    continue
                logging.getLogger("sealbus").info("stopping on %s", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def _busy_poll_us(value: str) -> int:
    from .access.config import busy_poll_problem

    why = busy_poll_problem(value)
    if why:
        raise argparse.ArgumentTypeError(why)
    return int(value)


def cmd_run(argv: list[str]) -> int:
    from .io.gc_policy import for_serving

    for_serving()  # before trio and the bus are imported, not only once serving (io/gc_policy.py)
    p = argparse.ArgumentParser(
        prog="sealbus run",
        description="Start a bus. With no options: an unprivileged session-style bus on a socket under "
        "$XDG_RUNTIME_DIR (or a private temp dir), allow-all policy, fd mode 'any'. The first line of "
        "stdout is the bus address; logs go to stderr; SIGINT/SIGTERM stop it and remove the socket.",
    )
    p.add_argument("--address", help="where to listen, e.g. unix:path=/tmp/bus or unix:abstract=name")
    p.add_argument("--config", help="a dbus-daemon XML config file (with optional <sealbus> element)")
    p.add_argument("--fd-mode", choices=["any", "sealed", "none"],
                   help="which fds the bus forwards: any (dbus-daemon compatible), sealed (only sealed "
                   "memfds and payload-fs snapshots), none")  # fmt: skip
    p.add_argument(
        "--payload-fs",
        metavar="DIR",
        help="also serve the FUSE payload filesystem at DIR (with "
        "--system it is always served: default <runtime dir>/fs, or /sys/fs/kdbus where that exists)",
    )
    p.add_argument("--system", action="store_true",
                   help="privilege-separated system bus: the launcher stays root (socket, payload fs mount, "
                        "USER_AVC audit records), the broker runs as the bus user with no capabilities, "
                        "Landlock and seccomp, and with SELinux enabled checks dbus send_msg/acquire_svc")  # fmt: skip
    p.add_argument("--runtime-dir", help="runtime directory for --system (default /run/sealbus)")
    p.add_argument("--systemd-activation", action="store_true",
                   help="with --system: the machine's system bus under systemd (dbus-daemon --systemd-activation): "
                        "services with SystemdService= are started by systemd (ActivationRequest), the others "
                        "by the launcher as their User=")  # fmt: skip
    p.add_argument("--busy-poll", metavar="USEC", type=_busy_poll_us, default=None,
                   help="longest time the broker polls for the next message before it sleeps (default 50; "
                        "0: never). The window adapts: it is zero on a quiet bus and grows only while "
                        "messages follow each other within USEC, trading CPU for round-trip latency "
                        "(config: <sealbus><busy_poll max_us=.../></sealbus>)")  # fmt: skip
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    setup_logging(args.log_level)
    if args.system:
        from .launch.launcher import main_system

        return main_system(args)
    try:
        return _run_session(args)
    except RunError as e:
        print(f"sealbus run: {e}", file=sys.stderr)
        return 1


class RunError(Exception):
    """What stops `sealbus run` before it serves: one line for the user, no traceback."""


def _session_settings(args):
    try:
        settings, cfg_listen = load_settings(args.config, fd_mode=args.fd_mode, payload_fs=args.payload_fs,
                                                    busy_poll_us=args.busy_poll)  # fmt: skip
    except ValueError as e:
        from .access.config import ConfigError  # only a config can raise it: the default starts without the parser

        if not isinstance(e, ConfigError):
            raise
        raise RunError(f"{e} (fix --config, or leave it out for the allow-all default)") from None  # names file+line
    fs = settings.payload_fs
    if fs and not os.path.isdir(fs):
        raise RunError(f"payload fs mount point {fs} is not a directory: create it first (mkdir -p {fs})")
    return settings, cfg_listen


def _run_session(args) -> int:
    from .io.address import AddressError, default_session_address, listen

    settings, cfg_listen = _session_settings(args)
    address = args.address or (cfg_listen[0] if cfg_listen else default_session_address())
    private_dir = None if args.address or cfg_listen else _private_temp_dir(address)
    try:
        try:
            listener = listen(address, socket_mode=0o666 if settings.bus_type == "system" else 0o777)
        except AddressError as e:
            raise RunError(f"{e} (--address takes e.g. unix:path=/tmp/sealbus.sock)") from None
        except OSError as e:
            raise RunError(f"cannot listen on {address}: {e.strerror or e}") from None
        try:

            def ready(bus):
                print(listener.address, flush=True)

            serve_until_signal(settings, [listener], ready)
        finally:
            listener.close()
    finally:
        if private_dir is not None:  # the embedded default's own temp dir: leave nothing behind
            with contextlib.suppress(OSError):
                os.rmdir(private_dir)
    return 0


def _private_temp_dir(address: str) -> str | None:
    """The private temp dir default_session_address() made for this bus (not $XDG_RUNTIME_DIR/sealbus)."""
    import tempfile

    if not address.startswith("unix:path="):
        return None
    d = os.path.dirname(address[len("unix:path=") :])
    if os.path.dirname(d) == tempfile.gettempdir() and os.path.basename(d).startswith("sealbus-"):
        return d
    return None


def _fd_arg(value: str | None, default: int = 1) -> int:
    if value is None or value == "":
        return default
    return int(value)


def _dbus_daemon_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sealbus dbus-daemon",
                                description="dbus-daemon compatible entry point of sealbus. --fork: the "
                                "process returns (status 0) once the bus serves, having printed the address "
                                "and pid asked for; the bus runs on detached (setsid, stdio on /dev/null; "
                                "stderr kept if DBUS_DEBUG_OUTPUT is set), and writes <pidfile> unless "
                                "--nopidfile. <fork/> in the config forks unless --nofork.")  # fmt: skip
    p.add_argument("--config-file")
    p.add_argument("--session", action="store_true")
    p.add_argument("--system", action="store_true")
    p.add_argument("--nofork", action="store_true")
    p.add_argument("--fork", action="store_true")
    p.add_argument("--nopidfile", action="store_true")
    p.add_argument("--print-address", nargs="?", const="", default=None)
    p.add_argument("--print-pid", nargs="?", const="", default=None)
    p.add_argument("--address")
    p.add_argument("--systemd-activation", action="store_true")
    p.add_argument("--syslog", action="store_true")
    p.add_argument("--nosyslog", action="store_true")
    p.add_argument("--syslog-only", action="store_true")
    p.add_argument("--introspect", action="store_true")
    p.add_argument("--version", action="store_true")
    p.add_argument("--fd-mode", choices=["any", "sealed", "none"])
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return p


def _daemon_config(args) -> str | None:
    config = args.config_file
    if args.session and not config:
        config = "/usr/share/dbus-1/session.conf"
    if args.system and not config:
        config = "/usr/share/dbus-1/system.conf"
    return config


def _daemon_listeners(args, cfg_listen: list[str]) -> list:
    from .io.address import AddressError, listen, systemd_listeners

    listeners = []
    try:
        if args.address:
            listeners = [listen(args.address)]
        else:
            for a in cfg_listen:
                listeners.append(systemd_listeners()[0] if a == "systemd:" else listen(a))
        if not listeners:
            raise AddressError("no <listen> address in the configuration and no --address")
    except (AddressError, OSError, IndexError) as e:
        for lst in listeners:
            lst.close()
        raise LookupError(str(e)) from None
    return listeners


def cmd_dbus_daemon(argv: list[str]) -> int:
    """dbus-daemon's command line, so existing tooling can start sealbus unchanged."""
    from .io.gc_policy import for_serving

    for_serving()  # before trio and the bus are imported, not only once serving (io/gc_policy.py)
    ensure_standard_fds()  # before any socket is made: started with stdio closed, it must not become fd 0-2
    args = _dbus_daemon_parser().parse_args(argv)
    if args.version:
        print("sealbus dbus-daemon compatible entry (D-Bus Message Bus Daemon 1.14 command line)")
        return 0
    if args.introspect:
        from .bus.driver import INTROSPECTION

        sys.stdout.write(INTROSPECTION)
        return 0
    setup_logging(args.log_level)
    config = _daemon_config(args)
    if not config:
        print("sealbus dbus-daemon: no configuration file specified (--config-file, --session or --system)",
              file=sys.stderr)  # fmt: skip
        return 1
    try:
        settings, cfg_listen = load_settings(config, fd_mode=args.fd_mode,
                                                    systemd_activation=args.systemd_activation or None)  # fmt: skip
    except Exception as e:  # a config error must stop start-up, with its reason
        print(f"sealbus dbus-daemon: {e}", file=sys.stderr)
        return 1
    cfg = settings.config
    pidfile = None if args.nopidfile else cfg.pidfile
    try:
        bus_user = daemon_user(cfg.user, config)
        check_pidfile(pidfile)
        listeners = _daemon_listeners(args, cfg_listen)
    except LookupError as e:
        print(f"sealbus dbus-daemon: {e}", file=sys.stderr)
        return 1
    out = DaemonOutput(args, pidfile)
    if args.fork or (cfg.fork and not args.nofork):
        out.become_daemon(cfg.keep_umask)  # returns in the child only
    try:
        out.write_pidfile()  # before serving, as dbus-daemon: a pid file that cannot be written stops start-up
        return _serve_daemon(args, config, settings, bus_user, listeners, out)
    except OSError as e:
        print(f"sealbus dbus-daemon: {e}", file=sys.stderr)
        for lst in listeners:
            lst.close()
        return 1
    finally:
        out.remove_pidfile()


def _serve_daemon(args, config: str, settings, bus_user, listeners, out) -> int:
    def announce(guid: str) -> None:
        out.ready(f"{listeners[0].address},guid={guid}")

    if bus_user is not None:
        from .launch.launcher import serve_as_user

        # as `sealbus run --system`: this process stays root (sockets, payload fs mount, audit, reload) and the
        # bus is served by a broker running as <user>, with no capabilities, no_new_privs, Landlock and seccomp;
        # the pid printed and written to the pidfile is this one (the process to signal)
        cfg = settings.config
        overrides = {"systemd_activation": args.systemd_activation or None, "fd_mode": args.fd_mode}
        return serve_as_user(cfg, config, bus_user, listeners, log_level=args.log_level,
                             payload_fs=cfg.sealbus.payload_fs, runtime=None,
                             announce=lambda ready: announce(ready["guid"]), overrides=overrides,
                             owner_uid=bus_user.pw_uid)  # fmt: skip

    def ready(bus):
        announce(bus.guid)

    try:
        serve_until_signal(settings, listeners, ready)
    finally:
        for lst in listeners:
            lst.close()
    return 0


def ensure_standard_fds() -> None:
    """Fds 0-2 open (on /dev/null where closed), as dbus-daemon's _dbus_ensure_standard_fds: a socket or
    file opened later must never land on them (a forked bus points them at /dev/null)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)


def check_pidfile(pidfile: str | None) -> None:
    """As dbus-daemon: refuse to start over an existing pid file (before any socket is touched)."""
    if pidfile and os.path.lexists(pidfile):
        raise LookupError(f'The pid file "{pidfile}" exists, if the message bus is not running, remove this file')


class DaemonOutput:
    """What the bus tells its starter once it serves: --print-address, --print-pid, the pid file.

    Without --fork this process writes them itself. With --fork (become_daemon) the parent waits on a pipe
    until the detached child serves, writes the address and pid the child sends, and exits 0 (1 if the
    child ends first); the child writes the pid file and removes it on the way out."""

    def __init__(self, args, pidfile: str | None):
        self.print_address = None if args.print_address is None else _fd_arg(args.print_address)
        self.print_pid = None if args.print_pid is None else _fd_arg(args.print_pid)
        self.pidfile = pidfile
        self.pipe: int | None = None  # the child's end of the readiness pipe, after become_daemon
        self.wrote_pidfile = False

    def become_daemon(self, keep_umask: bool) -> None:
        r, w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            os.close(w)
            os._exit(self._parent(r))  # no clean-up here: the sockets and the pid file are the child's
        os.close(r)
        self.pipe = w
        for fd in {self.print_address, self.print_pid} - {None, 0, 1, 2}:
            os.close(fd)  # the parent writes them; a reader waiting for EOF must not wait for the bus
        os.setsid()
        os.chdir("/")
        if not keep_umask:
            os.umask(0o022)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1) if os.environ.get("DBUS_DEBUG_OUTPUT") else (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        root = logging.getLogger()
        level = root.level
        for h in list(root.handlers):  # log lines name this process, not the parent that returned
            root.removeHandler(h)
        setup_logging(logging.getLevelName(level).lower())

    def _parent(self, r: int) -> int:
        chunks = []
        while chunk := os.read(r, 4096):
            chunks.append(chunk)
        pid, _, address = b"".join(chunks).decode().partition("\n")
        if not address:
            print("sealbus dbus-daemon: the bus exited before it served", file=sys.stderr)
            return 1
        self._print(address, int(pid))
        return 0

    def _print(self, address: str, pid: int) -> None:
        if self.print_address is not None:
            _write_fd(self.print_address, address + "\n")
        if self.print_pid is not None:  # the process to signal: as root with a <user>, the launcher
            _write_fd(self.print_pid, f"{pid}\n")

    def write_pidfile(self) -> None:
        if self.pidfile:
            try:
                with open(self.pidfile, "x") as f:  # never through a file or link put there meanwhile
                    self.wrote_pidfile = True
                    f.write(f"{os.getpid()}\n")
            except OSError as e:
                raise OSError(f"cannot write the pid file {self.pidfile}: {e.strerror}") from None

    def ready(self, address: str) -> None:
        if self.pipe is None:
            self._print(address, os.getpid())
            return
        os.write(self.pipe, f"{os.getpid()}\n{address}".encode())
        os.close(self.pipe)
        self.pipe = None

    def remove_pidfile(self) -> None:
        if self.wrote_pidfile:
            try:
                os.unlink(self.pidfile)
            except OSError:
                pass


def daemon_user(name: str | None, config: str):
    """The user the bus must run as (its pwd entry), or None to stay the invoking user; as dbus-daemon.

    <user> names a user that does not exist: LookupError, whoever starts the bus. Started as root: that
    user, served through the launcher/broker split; no <user>: the bus stays root, with a warning. Not
    root: dbus-daemon (built with libaudit, as distributions ship it) cannot change user and keeps
    running as the invoking user; so does sealbus, with a warning when <user> names someone else."""
    import pwd

    if name is None:
        if os.geteuid() == 0:
            logging.getLogger("sealbus").warning(
                "started as root and %s names no <user>: the bus runs as root, with every capability (as "
                "dbus-daemon); name the bus user in <user> to serve it from a sandboxed broker",
                config,
            )
        return None
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        raise LookupError(f'Could not get UID and GID for username "{name}" (<user> in {config})') from None
    if os.geteuid() == 0:
        return user
    if user.pw_uid != os.geteuid():
        logging.getLogger("sealbus").warning("<user>%s</user> in %s: not started as root, so the bus runs as "
                                             "uid %d (as dbus-daemon)", name, config, os.geteuid())  # fmt: skip
    return None


def _write_fd(fd: int, text: str) -> None:
    if fd == 1:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        os.write(fd, text.encode())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(DESCRIPTION)
        return 0 if argv else 2
    if argv[0] == "--version":
        from importlib.metadata import version

        from . import build

        print(f"sealbus {version('sealbus')} (hot path: {build()})")
        return 0
    try:
        return _dispatch(argv[0], argv[1:])
    except KeyboardInterrupt:  # Ctrl-C: quietly, with the shell's code for SIGINT
        return 130


def _dispatch(cmd: str, rest: list[str]) -> int:
    if cmd == "run":
        return cmd_run(rest)
    if cmd == "dbus-daemon":
        return cmd_dbus_daemon(rest)
    if cmd == "policy":
        from .access.policy_cli import main as policy_main

        return policy_main(rest)
    if cmd in ("send", "receive", "cat-payload"):
        from .client.commands import main as client_main

        return client_main([cmd, *rest])
    if cmd == "bench":
        from .client.bench import main as bench_main

        return bench_main(rest)
    print(f"sealbus: unknown command {cmd!r}\n\n{DESCRIPTION}", file=sys.stderr)
    return 2


def dbus_daemon_main() -> int:
    return cmd_dbus_daemon(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
