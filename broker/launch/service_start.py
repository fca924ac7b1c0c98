"""The launcher's half of bus activation: starting a service by name, as its User=.

The broker (sandboxed, no capabilities, seccomp) never execs. It asks over
the control channel for a *name* (``{"type": "start", "name": N}``); it can
neither pass a command line, an environment nor a user. The launcher looks
the name up itself in the service directories of its own configuration
(the file is re-read at every start), refuses anything that is not a valid
activatable system service with a ``User=`` that exists, and spawns
``Exec=`` as that user: supplementary groups of the user, then
setresgid/setresuid, no_new_privs, a new session, a clean environment (PATH
and the DBUS_STARTER_* variables only: nothing the broker or a client chose),
stdin on /dev/null, stdout/stderr on the launcher's log. It reaps the child
and reports how it ended (``start_result`` with ``status``, or ``error`` and
``text`` when it could not start it), the broker turning an exit before the
name was taken into ChildExited/ChildSignaled, as dbus-daemon does.

Each request carries the broker's id for that start, echoed in the answers,
so that a late answer about an earlier start of the same name is never taken
for the current one. Bounded: at most ``MAX_CHILDREN`` started services not
yet reaped; a ``stop`` (the start timed out) kills the child of that start,
and only that.
"""

import logging
import os
import pwd
import signal
import subprocess

from ..activation.service_file import SUFFIX, ServiceFileError, read_service_file
from ..bus.activation import SPAWN
from ..bus.common import E
from ..io.activation import exec_argv
from ..wire import name_syntax as wn

log = logging.getLogger("sealbus.launcher")

MAX_CHILDREN = 1024
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class StartRefused(Exception):
    def __init__(self, error: str, text: str):
        super().__init__(text)
        self.error, self.text = error, text


def become_service_user(uid: int, gid: int, groups: list[int]):
    """The child's last step before exec (a preexec_fn; the launcher has no threads)."""

    def drop() -> None:
        import ctypes

        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
            raise OSError(ctypes.get_errno(), "cannot set no_new_privs")
        os.chdir("/")

    return drop


def lookup_service(dirs, name: str, *, system_bus: bool):
    """The service file for ``name``, read now from the first of ``dirs`` that has ``name``.service (the
    launch helper's rule: the file is named after the name); None if none has; StartRefused if it is
    invalid or names another service."""
    for d in dirs:
        path = os.path.join(getattr(d, "path", d), name + SUFFIX)
        if not os.path.lexists(path):
            continue
        try:
            entry = read_service_file(path, system_bus=system_bus)
        except ServiceFileError as e:
            raise StartRefused(SPAWN + "FileInvalid", str(e)) from None
        if entry.name != name:
            raise StartRefused(SPAWN + "FileInvalid", f"{path} provides {entry.name}, not {name}")
        return entry
    return None


class ServiceSpawner:
    """Starts services for the broker, by name only (see the module docstring)."""

    def __init__(self, dirs, send, *, bus_type: str = "system"):
        self.dirs = dirs  # the configured service directories (replaced on reload), searched at every start
        self.send = send  # a dict to the broker
        self.bus_type = bus_type
        self.address = ""  # the bus address services are told (DBUS_STARTER_ADDRESS)
        # the broker's start id -> (name, the process started for it), until reaped
        self.children: dict[int, tuple[str, subprocess.Popen]] = {}

    def handle(self, msg: dict) -> None:
        name, ident = msg.get("name"), msg.get("id")
        if not isinstance(ident, int) or isinstance(ident, bool):
            ident = None
        if msg.get("type") == "stop":
            name_proc = self.children.get(ident)
            if name_proc is not None and name_proc[0] == name and name_proc[1].poll() is None:
                log.warning("killing %s (pid %d): its start timed out", name, name_proc[1].pid)
                name_proc[1].send_signal(signal.SIGKILL)
            return
        try:
            if ident is None or ident in self.children:
                raise StartRefused(SPAWN + "ServiceNotValid", "a start needs an id of its own")
            proc = self.start(name)
        except StartRefused as e:
            log.warning("not starting %r for the broker: %s", name, e.text)
            self.send({"type": "start_result", "name": name if isinstance(name, str) else "", "id": ident,
                       "error": e.error, "text": e.text})  # fmt: skip
            return
        self.children[ident] = (name, proc)

    def start(self, name) -> subprocess.Popen:
        if not isinstance(name, str) or not wn.is_well_known_name(name):
            raise StartRefused(SPAWN + "ServiceNotValid", "Bus name is not valid or missing")
        if len(self.children) >= MAX_CHILDREN:
            raise StartRefused(E + "LimitsExceeded", f"{MAX_CHILDREN} started services not yet reaped")
        entry = lookup_service(self.dirs, name, system_bus=self.bus_type == "system")
        if entry is None:
            raise StartRefused(SPAWN + "ServiceNotFound", "Bus name not found in system service directory")
        if not entry.user:
            raise StartRefused(SPAWN + "PermissionsInvalid",
                               f"{entry.path}: no User= (required on the system bus)")  # fmt: skip
        try:
            pw = pwd.getpwnam(entry.user)
        except KeyError:
            raise StartRefused(
                SPAWN + "PermissionsInvalid", f"{entry.path}: User={entry.user} does not exist"
            ) from None
        try:
            argv = exec_argv(entry.exec or "")
        except ValueError as e:
            raise StartRefused(E + "InvalidArgs", f"{entry.path}: invalid Exec= line: {e}") from None
        groups = sorted(set(os.getgrouplist(pw.pw_name, pw.pw_gid)))
        env = {"PATH": DEFAULT_PATH, "DBUS_STARTER_BUS_TYPE": self.bus_type}
        if self.address:
            env["DBUS_STARTER_ADDRESS"] = self.address
            if self.bus_type in ("system", "session"):
                env[f"DBUS_{self.bus_type.upper()}_BUS_ADDRESS"] = self.address
        try:
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=2, stderr=2, cwd="/",
                                    start_new_session=True,
                                    preexec_fn=become_service_user(pw.pw_uid, pw.pw_gid, groups))  # noqa: PLW1509  # fmt: skip
        except OSError as e:
            raise StartRefused(
                SPAWN + "ExecFailed", f"Failed to execute program {argv[0]}: {e.strerror or e}"
            ) from None
        log.info("started %s for %s as %s (pid %d)", argv[0], name, entry.user, proc.pid)
        return proc

    def reap(self) -> None:
        """Report the started services that ended (called from the supervise loop)."""
        for ident, (name, proc) in list(self.children.items()):
            status = proc.poll()
            if status is None:
                continue
            del self.children[ident]
            log.info("service %s (pid %d) ended with status %d", name, proc.pid, status)
            self.send({"type": "start_result", "name": name, "id": ident, "status": status})
