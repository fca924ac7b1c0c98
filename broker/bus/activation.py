"""Bus activation in the core: the names being started and the messages waiting for them.

Sans-IO, like the reply registry. A message to an unowned activatable name
(without NO_AUTO_START), or a StartServiceByName call, makes a
:class:`PendingStart` for that name, and every later one for the same name
joins it as a :class:`Waiter`, in arrival order. Starting the service is the
shell's job: the core appends the pending start to ``requests`` and calls
``on_request``; the shell hands the *name* to the root launcher or to its
session spawn helper (broker/io/activation.py) and reports back through
:meth:`Activator.start_failed` or :meth:`Activator.child_exited`. With systemd
activation the core itself sends systemd the ActivationRequest signal, queued
as a bus-sent waiter on ``org.freedesktop.systemd1`` until systemd is on the
bus, and takes ActivationFailure back (:meth:`Activator.systemd_failure`).

When the name gets an owner (:meth:`Activator.name_owned`, called by the
router) the queued messages are routed in order, through the same policy
checks as any message, and StartServiceByName callers get 1. When the start
fails every waiter gets dbus-daemon's error. ``service_start_timeout`` is
enforced with the shell's clock (:meth:`Activator.expire`, as
``ReplyRegistry.expire``).

Policy comes first: an auto-start is checked against the send rules and
SELinux ``send_msg`` (as if the service already owned the name) before
anything is started, so a denied sender never makes the bus start anything.

Bounded: waiters on the whole bus <= ``max_pending_service_starts`` (counted
as dbus-daemon counts them), per uid <= a quarter of it (root: the bus limit
only); the bytes of the messages queued for one name <= ``max_outgoing_bytes``
and per sending uid <= ``max_outgoing_bytes_per_user``; the fds of a queued
message stay charged to the sender's fd share (its FdRef) until it is routed
or dropped. A waiter leaves with its peer (``Peer.starts``).
"""

import logging

from ..wire import message as wm
from ..wire import name_syntax as wn
from .common import DBUS_NAME, DBUS_PATH, BusError, E

log = logging.getLogger("sealbus.activation")

SYSTEMD = "org.freedesktop.systemd1"
ACTIVATOR = "org.freedesktop.systemd1.Activator"
SPAWN = E + "Spawn."
START_REPLY_SUCCESS, START_REPLY_ALREADY_RUNNING = 1, 2
MAX_ENV_ENTRIES = 1024
MAX_ENV_BYTES = 256 * 1024


class Waiter:
    """One sender waiting for a name: a queued message (auto-start) or a StartServiceByName call."""

    __slots__ = ("fdref", "msg", "nbytes", "peer", "serial", "start")

    def __init__(self, start, peer, serial: int, msg=None, fdref=None, nbytes: int = 0):
        self.start = start  # its PendingStart
        self.peer = peer  # the sender; None: the bus itself (ActivationRequest, SetEnvironment)
        self.serial = serial  # of the message, for the error reply (or StartServiceByName's answer)
        self.msg = msg  # a private copy (HeaderView) of the message to deliver; None: StartServiceByName
        self.fdref = fdref  # its fds, referenced while queued
        self.nbytes = nbytes  # charged to the sender's account while queued


class PendingStart:
    """A name being started, and who waits for it (insertion-ordered)."""

    __slots__ = ("deadline", "done", "ident", "name", "on_done", "qbytes", "service", "waiters")

    def __init__(self, name: str, service, ident: int = 0):
        self.name = name
        self.ident = ident  # this start's number on the bus (what the launcher's answers name)
        self.service = service  # the catalog's entry (None: systemd itself, in systemd-activation mode)
        self.waiters: dict[Waiter, None] = {}
        self.qbytes = 0  # bytes of the messages queued for this name
        self.deadline = None  # in the shell's clock, once stamped by expire()
        self.done = None  # None while pending, then "owned", "failed" or "timeout"
        self.on_done = None  # shell hook, called with ``done`` (e.g. kill a child that timed out)


def uid_share(limit: int) -> int:
    """Waiters one uid may have: a quarter of max_pending_service_starts."""
    return max(1, limit // 4)


class Activator:
    def __init__(self, bus):
        self.bus = bus
        self.systemd = False  # --systemd-activation: SystemdService= entries are started by systemd
        self.via_launcher = False  # a root launcher starts services (system bus): no environment updates
        self.pending: dict[str, PendingStart] = {}
        self.count = 0  # waiters on the whole bus (max_pending_service_starts)
        self.started = 0  # starts so far (each PendingStart's ident)
        self.requests: list[PendingStart] = []  # starts the shell must perform (drained by it)
        self.on_request = None  # shell hook: requests is no longer empty
        self.fresh: dict[PendingStart, None] = {}  # pending starts awaiting their deadline
        self.timed: dict[PendingStart, None] = {}  # stamped, in deadline order (one timeout for all)
        self.on_armed = None  # shell hook: call expire() soon
        self.base_env: dict[str, str] = {}  # the spawn helper's inherited environment (set by the shell)
        self.env: dict[str, str] = {}  # UpdateActivationEnvironment
        self.address = ""  # DBUS_STARTER_ADDRESS

    # -- lookups -------------------------------------------------------------

    def entry(self, name: str):
        """The service that provides ``name``, or None."""
        catalog = self.bus.catalog  # replaced whole by a reload; starts already pending keep their entry
        if catalog is None or not name or name[0] == ":":
            return None
        return catalog.get(name)

    def activatable(self, name: str) -> bool:
        return (self.systemd and name == SYSTEMD) or self.entry(name) is not None

    def environment(self) -> dict[str, str]:
        """What a spawned service gets: the helper's environment, the updates, and where the bus is."""
        env = {**self.base_env, **self.env}
        if self.address:
            env["DBUS_STARTER_ADDRESS"] = self.address
            kind = self.bus.bus_type
            if kind:
                env["DBUS_STARTER_BUS_TYPE"] = kind
                if kind in ("session", "system"):
                    env[f"DBUS_{kind.upper()}_BUS_ADDRESS"] = self.address
        return env

    # -- starting ----------------------------------------------------------------

    def auto_start(self, peer, h, fdref) -> None:
        """``h`` (a call or signal from ``peer``) is addressed to an unowned activatable name: queue it
        and start the service, or answer why not. Monitors see the message after the ActivationRequest
        it causes and before any error, as with dbus-daemon."""
        bus = self.bus
        name = h.destination
        try:
            self._check_room(peer, name)
            if bus.policy is not None and not (self.systemd and name == SYSTEMD):
                err = bus.policy_activation(peer, h, name, fdref)
                if err is not None:
                    log.warning("denied activation of %s for %s: %s", name, peer.describe(), err)
                    raise BusError("AccessDenied", err)
            copy = wm.HeaderView(memoryview(bytes(h.raw)))
            nbytes = len(copy.raw)
            self._check_bytes(peer, name, nbytes)
        except BusError as e:
            bus.show_monitors(peer, h, fdref)
            bus.send_error(peer, h.serial, e.name, e.text)
            return
        if fdref is not None:
            fdref.incref()
        start, new = self._join(name, peer, h.serial, copy, fdref, nbytes)
        if new:
            self._launch(start, peer)
        bus.show_monitors(peer, h, fdref)

    def start_by_name(self, peer, h, name: str):
        """StartServiceByName: the answer now (2: running), or NotImplemented (answered when it is
        owned or fails); BusError when it cannot be started."""
        if self.bus.resolve(name) is not None:
            return (START_REPLY_ALREADY_RUNNING,)
        self._check_room(peer, name)
        if not self.activatable(name):
            raise BusError("ServiceUnknown", f"The name {name} was not provided by any .service files")
        start, new = self._join(name, peer, h.serial)
        if new:
            self._launch(start, peer)
        return NotImplemented

    def _check_room(self, peer, name: str) -> None:
        lim = self.bus.limits.max_pending_service_starts
        if self.count >= lim:
            raise BusError("LimitsExceeded", "The maximum number of pending activations has been reached, "
                           f"activation of {name} failed (max_pending_service_starts={lim})")  # fmt: skip
        if peer is not None and peer.creds.uid != 0 and peer.account.pending_starts >= uid_share(lim):
            raise BusError("LimitsExceeded", f"uid {peer.creds.uid} has {peer.account.pending_starts} "
                           f"activations pending, its share of max_pending_service_starts={lim}")  # fmt: skip

    def _check_bytes(self, peer, name: str, nbytes: int) -> None:
        lim = self.bus.limits
        start = self.pending.get(name)
        if start is not None and start.qbytes + nbytes > lim.max_outgoing_bytes:
            raise BusError("LimitsExceeded", f"the messages queued for {name} are over max_outgoing_bytes")
        if peer is not None and peer.account.start_bytes + nbytes > lim.max_outgoing_bytes_per_user:
            raise BusError("LimitsExceeded", f"the messages uid {peer.creds.uid} queued for services being "
                           "started are over max_outgoing_bytes_per_user")  # fmt: skip

    def _join(self, name: str, peer, serial: int, msg=None, fdref=None, nbytes: int = 0):
        start = self.pending.get(name)
        new = start is None
        if new:
            self.started += 1
            start = self.pending[name] = PendingStart(name, self.entry(name), self.started)
            armed = not self.fresh
            self.fresh[start] = None
            if armed and self.on_armed is not None:
                self.on_armed()
        w = Waiter(start, peer, serial, msg, fdref, nbytes)
        start.waiters[w] = None
        start.qbytes += nbytes
        self.count += 1
        if peer is not None:
            if not peer.starts:  # the shared empty table (bus/peer.py no_entries) until its first wait
                peer.starts = {}
            peer.starts[w] = None
            peer.account.pending_starts += 1
            peer.account.start_bytes += nbytes
        return start, new

    def _launch(self, start: PendingStart, peer) -> None:
        who = peer.describe() if peer is not None else "the bus"
        if self.systemd and start.name == SYSTEMD:
            log.info("waiting for systemd to connect (activation requested by %s)", who)
            return
        unit = getattr(start.service, "systemd_service", None)
        if self.systemd and unit:
            log.info("activating via systemd: service name='%s' unit='%s' requested by %s", start.name, unit, who)
            raw = wm.signal_message(self.bus.next_serial(), DBUS_PATH, ACTIVATOR, "ActivationRequest", "s",
                                    (unit,), destination=SYSTEMD)  # fmt: skip
            self.send_or_queue(raw)
            return
        log.info("activating service name='%s' requested by %s", start.name, who)
        self.requests.append(start)
        if self.on_request is not None:
            self.on_request()

    def send_or_queue(self, raw: bytes) -> None:
        """A message from the bus to systemd: delivered now if systemd is on the bus (addressed to its
        unique name if the message says so), else shown to monitors and queued until it is (dbus-daemon's
        bus_driver_send_or_activate)."""
        bus = self.bus
        h = wm.HeaderView(memoryview(raw))
        owner = bus.resolve(h.destination)
        if owner is not None:
            bus.send_from_bus(owner, raw)
            return
        bus.show_monitors(None, h, None)
        try:
            self._check_room(None, h.destination)
        except BusError as e:
            log.warning("dropped %s for %s: %s", h.member, h.destination, e.text)
            return
        start, new = self._join(h.destination, None, h.serial, h, None, 0)
        if new:
            self._launch(start, None)

    # -- outcomes ---------------------------------------------------------------

    def name_owned(self, name: str, owner) -> None:
        """``name`` just got ``owner``: answer StartServiceByName callers, deliver queued messages in order."""
        start = self.pending.pop(name, None)
        if start is None:
            return
        log.info("successfully activated service '%s'", name)
        self._untime(start)
        bus = self.bus
        for w in list(start.waiters):
            self._free(w)
            peer = w.peer
            try:
                if w.msg is None:
                    if peer is not None and not peer.state:
                        bus.send_reply(peer, w.serial, "u", (START_REPLY_SUCCESS,))
                elif peer is None:
                    if not owner.state:
                        bus.send_from_bus(owner, bytes(w.msg.raw), seen=True)
                elif not peer.state and not owner.state:
                    bus.deliver_queued(peer, w.msg, w.fdref, owner)
            finally:
                if w.fdref is not None:
                    w.fdref.decref()
        self._finish(start, "owned")

    def start_failed(self, name: str, error: str, text: str, *, same_exec: bool = True) -> None:
        """Starting ``name`` failed: every waiter gets ``error``; so do the waiters of other names
        started by the same command line (dbus-daemon: one binary, one outcome)."""
        start = self.pending.get(name)
        if start is None or start.done is not None:
            return
        log.info("activated service '%s' failed: %s", name, text)
        exe = getattr(start.service, "exec", None)
        if same_exec and exe:
            for other in list(self.pending.values()):
                if other is not start and getattr(other.service, "exec", None) == exe:
                    self._fail(other, error, text, "failed")
        self._fail(start, error, text, "failed")

    def child_exited(self, name: str, start: PendingStart, status: int) -> None:
        """The process started for ``start`` ended (``status``: exit code, or -signal) before owning the
        name: an error for its waiters unless it exited 0 (a service may fork and exit)."""
        if start.done is not None or self.pending.get(name) is not start or status == 0:
            return
        if status > 0:
            self.start_failed(name, SPAWN + "ChildExited", f"Process {name} exited with status {status}")
        else:
            self.start_failed(name, SPAWN + "ChildSignaled", f"Process {name} received signal {-status}")

    def systemd_failure(self, peer, h) -> None:
        """The ActivationFailure signal to the bus: only systemd's own connection is believed."""
        bus = self.bus
        if not bus.driver.privileged(peer):
            bus.send_error(peer, h.serial, E + "AccessDenied",
                           f"Connection {peer.unique_name} (uid {peer.creds.uid}) is not privileged "
                           "for ActivationFailure")  # fmt: skip
            return
        if bus.resolve(SYSTEMD) is not peer:
            log.warning("ignoring forged ActivationFailure message from %s", peer.describe())
            return
        if not self.systemd:
            log.warning("ignoring unexpected ActivationFailure message while not using systemd activation")
            return
        try:
            unit, code, text = h.unmarshal_body() if h.signature == "sss" else (None, None, None)
        except Exception:  # a malformed body names no unit
            unit = None
        if not unit:
            return
        log.info("activation via systemd failed for unit '%s': %s", unit, text)
        if not wn.is_error_name(code):
            code = E + "Failed"
        for start in list(self.pending.values()):
            if getattr(start.service, "systemd_service", None) == unit:
                self._fail(start, code, text, "failed")

    def expire(self, now: float) -> None:
        """Stamp new pending starts with their deadline (``now`` + service_start_timeout) and fail the
        ones that are due with TimedOut."""
        timeout = self.bus.limits.service_start_timeout
        if self.fresh:
            for start in self.fresh:
                start.deadline = now + timeout / 1000
                self.timed[start] = None
            self.fresh.clear()
        due = []
        for start in self.timed:
            if start.deadline > now:
                break
            due.append(start)
        for start in due:
            text = f"Failed to activate service '{start.name}': timed out (service_start_timeout={timeout}ms)"
            log.warning("%s", text)
            self._fail(start, E + "TimedOut", text, "timeout")

    def next_deadline(self) -> float | None:
        if self.fresh:
            return float("-inf")
        return next(iter(self.timed)).deadline if self.timed else None

    def peer_gone(self, peer) -> None:
        """``peer`` left: its queued messages and StartServiceByName calls go (the starts go on)."""
        for w in list(peer.starts):
            del w.start.waiters[w]
            self._free(w)
            if w.fdref is not None:
                w.fdref.decref()

    # -- UpdateActivationEnvironment ------------------------------------------------

    def update_environment(self, env: dict[str, str]) -> None:
        """Future spawns get ``env``; with systemd activation systemd gets it too (SetEnvironment)."""
        for k, v in env.items():
            if not k or "=" in k or "\0" in k or "\0" in v:
                raise BusError("InvalidArgs", f"invalid environment variable name or value: {k!r}")
        merged = {**self.env, **env}
        if len(merged) > MAX_ENV_ENTRIES or sum(len(k) + len(v) + 2 for k, v in merged.items()) > MAX_ENV_BYTES:
            raise BusError("LimitsExceeded", "activation environment too large")
        self.env = merged
        if not self.systemd:
            return
        owner = self.bus.resolve(SYSTEMD)  # as dbus-daemon: addressed to systemd's unique name when it is there
        raw = wm.build_message(wm.METHOD_CALL, self.bus.next_serial(), path="/org/freedesktop/systemd1",
                               interface="org.freedesktop.systemd1.Manager", member="SetEnvironment",
                               destination=owner.unique_name if owner is not None else SYSTEMD,
                               sender=DBUS_NAME, signature="as", body=([f"{k}={v}" for k, v in env.items()],),
                               flags=wm.NO_REPLY_EXPECTED)  # fmt: skip
        if owner is not None:
            self.bus.send_from_bus(owner, raw)
        else:
            self.send_or_queue(raw)

    # -- bookkeeping -------------------------------------------------------------------

    def _fail(self, start: PendingStart, error: str, text: str, why: str) -> None:
        if self.pending.get(start.name) is start:
            del self.pending[start.name]
        self._untime(start)
        bus = self.bus
        for w in list(start.waiters):
            self._free(w)
            if w.peer is not None and not w.peer.state:
                bus.send_error(w.peer, w.serial, error, text)
            if w.fdref is not None:
                w.fdref.decref()
        self._finish(start, why)

    def _finish(self, start: PendingStart, why: str) -> None:
        start.waiters.clear()
        start.done = why
        if start.on_done is not None:
            start.on_done(why)

    def _free(self, w: Waiter) -> None:
        self.count -= 1
        w.start.qbytes -= w.nbytes
        if w.peer is not None:
            w.peer.starts.pop(w, None)
            w.peer.account.pending_starts -= 1
            w.peer.account.start_bytes -= w.nbytes

    def _untime(self, start: PendingStart) -> None:
        self.fresh.pop(start, None)
        self.timed.pop(start, None)
