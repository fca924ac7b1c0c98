"""The shell's half of bus activation: performing the starts the core asks for, and its timer.

The core (broker/bus/activation.py) records which names must be started;
``run_activation`` takes them and hands each to a starter, outside the
routing pass:

- ``SessionStarter`` (a bus without a root launcher, e.g. ``sealbus
  dbus-daemon`` run as a user): spawns ``Exec=`` with trio's process support
  (a vfork+exec, never a wait on the loop), with the activation environment,
  stdin on /dev/null and stdout on the bus's stderr (stdout carries the bus
  address); it waits for the child in a task of its own and reports an exit
  before the name is owned (ChildExited / ChildSignaled; 0 is fine: a service
  may fork), a failed exec (ExecFailed), and kills a child that timed out.
- ``LauncherStarter`` (system bus): the broker never execs; it sends the
  launcher a *name* over the control channel (``{"type": "start", "name"}``)
  and the launcher, which re-reads and checks the service file itself,
  answers with ``start_result`` messages (``apply_start_result``), each
  naming the start (``id``) it is about.
"""

import logging
import os
import shlex
import signal
import subprocess

import trio

from ..bus.activation import SPAWN
from ..bus.common import E
from .timers import sleep_until_due

log = logging.getLogger("sealbus.activation")

# not the activated service's business (dbus-daemon drops the same ones): our journal stream, our
# listening sockets, our status notification socket, our invocation
NOT_INHERITED = ("JOURNAL_STREAM", "LISTEN_FDNAMES", "LISTEN_FDS", "LISTEN_PID", "NOTIFY_SOCKET", "INVOCATION_ID")


def inherited_environment(environ=None) -> dict[str, str]:
    env = dict(os.environ if environ is None else environ)
    for k in NOT_INHERITED:
        env.pop(k, None)
    return env


def exec_argv(exec_line: str) -> list[str]:
    """``Exec=`` as argv, with shell quoting rules (dbus-daemon's _dbus_shell_parse_argv); ValueError."""
    argv = shlex.split(exec_line, comments=False, posix=True)
    if not argv:
        raise ValueError("empty Exec= line")
    return argv


class SessionStarter:
    """Spawns services itself (no root launcher): the bus's own uid, its own environment."""

    def __init__(self, nursery):
        self.nursery = nursery

    def start(self, bus, server, start) -> None:
        self.nursery.start_soon(self._run, bus, server, start)

    async def _run(self, bus, server, start) -> None:
        act = bus.activator
        name = start.name
        try:
            argv = exec_argv(getattr(start.service, "exec", "") or "")
        except ValueError as e:
            act.start_failed(name, E + "InvalidArgs", f"Invalid Exec= line for {name}: {e}")
            _flush(server)
            return
        try:
            proc = await trio.lowlevel.open_process(argv, env=act.environment(), stdin=subprocess.DEVNULL,
                                                    stdout=2 if _fd_open(2) else subprocess.DEVNULL,
                                                    start_new_session=True)  # fmt: skip
        except OSError as e:
            act.start_failed(name, SPAWN + "ExecFailed", f"Failed to execute program {argv[0]}: {e.strerror or e}")
            _flush(server)
            return
        log.info("started %s (pid %d) for %s", argv[0], proc.pid, name)

        def done(why: str) -> None:
            if why == "timeout" and proc.returncode is None:
                proc.send_signal(signal.SIGKILL)  # as dbus-daemon: a service that does not come up is killed

        start.on_done = done
        status = await proc.wait()
        start.on_done = None
        act.child_exited(name, start, status)
        _flush(server)


class LauncherStarter:
    """Asks the root launcher to start a name (never a command: the launcher reads the file itself)."""

    def __init__(self, send):
        self.send = send  # a dict to the launcher (control.send_msg on the control socket)

    def start(self, bus, server, start) -> None:
        def done(why: str) -> None:
            if why == "timeout":  # as dbus-daemon, a service that does not come up is killed
                try:
                    self.send({"type": "stop", "name": start.name, "id": start.ident})
                except OSError:
                    pass

        start.on_done = done
        try:
            self.send({"type": "start", "name": start.name, "id": start.ident})
        except OSError as e:
            bus.activator.start_failed(start.name, SPAWN + "Failed", f"cannot ask the launcher: {e}")


def default_starter(nursery, launcher):
    """The launcher (``launcher``: its control socket) on a privilege-separated bus, else ourselves."""
    if launcher is None:
        return SessionStarter(nursery)
    from .control import send_msg

    return LauncherStarter(lambda msg: send_msg(launcher, msg))


def apply_start_result(bus, msg: dict) -> None:
    """The launcher's answer about a start: ``error`` (a D-Bus error name) and ``text`` when it could not
    start it, or ``status`` when the process it started ended (exit code, or -signal)."""
    name = msg.get("name")
    if not isinstance(name, str):
        return
    act = bus.activator
    start = act.pending.get(name)
    if start is None or msg.get("id") != start.ident:  # about an earlier start of that name: it is over
        return
    error = msg.get("error")
    if isinstance(error, str) and error.startswith(E):
        act.start_failed(name, error, str(msg.get("text", "")), same_exec=False)
    elif isinstance(msg.get("status"), int):
        act.child_exited(name, start, msg["status"])
    if bus.server is not None:
        _flush(bus.server)


async def run_activation(bus, server, starter) -> None:
    """Perform the starts the core asks for, and enforce service_start_timeout."""
    act = bus.activator
    try:
        while True:
            wake = trio.Event()
            act.on_request = act.on_armed = wake.set
            if not act.requests:
                await sleep_until_due(act.next_deadline(), wake)
            act.expire(trio.current_time())
            requests, act.requests = act.requests, []
            for start in requests:
                if start.done is None:
                    starter.start(bus, server, start)
            _flush(server)
    finally:
        act.on_request = act.on_armed = None


def _flush(server) -> None:
    server.flush_dirty()
    server.reactor.finish_closing()


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False
