"""The bus core: routing (unicast, replies, broadcasts, monitors) and the messages the bus itself sends.

The state it routes over lives in one registry per concept, each with its own
invariants and tests: peers.py (connections, unique names, per-uid accounts),
names.py (well-known names and queues), matches.py (match rules), replies.py
(expected replies and reply_timeout), monitors.py; driver.py answers
``org.freedesktop.DBus``. Cleaning up after a peer walks only what that peer
owns in each registry.

Sans-IO. ``Bus.connect(creds)`` registers a peer; ``Bus.dispatch(peer, msg)``
routes one parsed message, appending to recipients' outboxes (and calling
their ``wake``); ``Bus.disconnect(peer)`` cleans up. Bodies and fds are passed
along untouched: each forwarded message gets one re-emitted header, shared by
every recipient, and the body ``memoryview`` it arrived in.
"""

import logging
import secrets
import struct

from ..wire import message as wm
from ..wire.errors import WireError
from .activation import ACTIVATOR, Activator
from .common import DBUS_NAME, DBUS_PATH, BusError, E
from .driver import FEATURES, Driver
from .lifecycle import CLOSING, GONE
from .limits import Limits
from .log_fields import DENIED, DISCONNECTED, LIMIT, about_peer
from .match import MatchRule, rule_hits
from .matches import MatchRegistry
from .monitors import Monitors
from .names import NameRegistry
from .peer import Creds, FdQuota, FdRef, OutItem, Peer, UserAccount
from .peers import PeerRegistry
from .replies import ReplyRegistry

METHOD_CALL, METHOD_RETURN, ERROR, NO_REPLY_EXPECTED = wm.METHOD_CALL, wm.METHOD_RETURN, wm.ERROR, wm.NO_REPLY_EXPECTED

log = logging.getLogger("sealbus.bus")


# A core built without the shell's answer (tests, benchmarks) belongs to root, with no label:
# it grants nobody a privilege root does not already have.
ROOT_OWNED = Creds(0)


_U32LE = struct.Struct("<I")
NO_REPLY_GONE = "Message recipient disconnected from message bus without replying"
NO_REPLY_TIMEOUT = "Message did not receive a reply (timeout by message bus)"


def error_template(destination: str, name: str, text: str) -> tuple[bytes, int] | None:
    """A bus error message to ``destination`` and the offset of its REPLY_SERIAL value, so that
    many errors differing only in serial and reply serial (the NoReply of every call a leaving
    peer owed) are built once and patched; None if the encoding does not allow it."""
    a = wm.error_message(1, 1, destination, name, text)
    b = wm.error_message(1, 2, destination, name, text)
    diff = [i for i in range(min(len(a), len(b))) if a[i] != b[i]]
    if a[:1] != b"l" or len(a) != len(b) or len(diff) != 1 or diff[0] % 4:
        return None
    return a, diff[0]


class _LazyBody:
    """A message body unmarshalled at most once, and only if some arg/path rule needs it."""

    __slots__ = ("h", "value")

    def __init__(self, h):
        self.h, self.value = h, None

    def get(self):
        if self.value is None:
            try:
                self.value = self.h.unmarshal_body() if self.h.signature else ()
            except WireError:
                self.value = False  # malformed: no arg rule can match
        return self.value


class Bus:
    def __init__(self, limits: Limits | None = None, *, guid: str | None = None, machine_id: str = "",
                 own: Creds = ROOT_OWNED):  # fmt: skip
        """``own``: the broker process's credentials (uid, groups, pid, label), read by the shell
        (broker.io.creds.own_creds): the driver answers credential queries about itself with them,
        and their uid is the bus owner's (privileged driver methods)."""
        self.limits = limits or Limits()
        self.guid = guid or secrets.token_hex(16)
        self.machine_id = machine_id or self.guid
        self.fd_quota = FdQuota()  # its pool is set from RLIMIT_NOFILE by the I/O shell
        # the registries, one concept each (their invariants are in their modules)
        self.conns = PeerRegistry(self.fd_quota)  # connected peers, unique names, per-uid accounts (peers.py)
        self.peers = self.conns.by_name  # unique name -> peer (read-only outside peers.py)
        self.all_peers = self.conns.all
        self.accounts = self.conns.accounts
        self.registry = NameRegistry()  # well-known names and their queues (names.py)
        self.matches = MatchRegistry()  # every peer's match rules (matches.py)
        self.eavesdroppers = self.matches.eavesdroppers  # peers with eavesdrop='true' rules (read-only here)
        self.replies = ReplyRegistry()  # expected replies (replies.py)
        self.monitoring = Monitors()  # monitor peers (monitors.py)
        self.monitors = self.monitoring.peers  # its dict (read-only here): a plain truth test per message
        self.serial = 0
        self.policy = None  # allow-all when None; see broker.access
        self.fd_vetter = None  # callable(peer, header, fds) raising BusError
        self.bus_type = "session"  # DBUS_STARTER_BUS_TYPE of activated services; set by the shell
        self.messages = 0  # every message routed: a field, as it moves with every message (GetStats shows it)
        self.stats = {"broadcasts": 0, "dropped_replies": 0, "limits": 0}
        self.reload_hook = None  # callable(peer, serial or None): ReloadConfig, answered later (the I/O shell's)
        # the catalogue of activatable services (broker.activation.catalog.ServiceCatalog: names(), get(name));
        # None: none. Replaced whole by a reload, never changed in place.
        self.catalog = None
        self.reloader = None  # the I/O shell's broker.io.reload.Reloader (request(): SIGHUP), set by serve()
        self.payload = None  # set by the payload layer: claim service, stats
        # Actions for the I/O shell: (fds, sender peer or None) the core is done with; the shell drains
        # this after each routing pass and closes them off the loop where that may block (see FdRef).
        self.closing: list[tuple[list[int], Peer | None]] = []
        self.server = None  # the I/O shell (broker.io.server.Server), set by serve(): flush_dirty()
        self.spawn = None  # start a trio task (the shell's nursery.start_soon), set by serve()
        self.driver = Driver(self)
        self.activator = Activator(self)  # bus activation (activation.py): pending starts, queued messages
        self.features = list(FEATURES)  # org.freedesktop.DBus.Features; the shell adds what its settings enable
        # The driver answers credential queries about itself with the broker's own.
        self.self_peer = Peer(0, own, UserAccount(own.uid), unique_name=DBUS_NAME)

    # -- connections ------------------------------------------------------

    def account(self, uid: int) -> UserAccount:
        return self.conns.account(uid)

    def can_accept(self, creds: Creds) -> str | None:
        """Why a new connection from ``creds`` must be refused, or None."""
        refused = self.refusal(creds)
        return None if refused is None else refused[1]

    def refusal(self, creds: Creds) -> tuple[str, str] | None:
        """("policy", why): refuse the connection; ("limit", why): answer its Hello with LimitsExceeded
        (as dbus-daemon; root is counted too); None: accept."""
        if self.policy is not None and not self.policy_connect(creds):
            return "policy", "the bus policy denies this user"
        why = self.conns.refusal(creds, self.limits)
        return None if why is None else ("limit", why)

    def policy_connect(self, creds: Creds) -> bool:
        d = self.policy.check_connect(creds)
        return bool(getattr(d, "allowed", d))

    def connect(self, creds: Creds, unix_fds: bool = True) -> Peer:
        return self.conns.add(creds, unix_fds)

    def disconnect(self, peer: Peer, reason: str = "") -> None:
        if peer.state is GONE:
            return  # disconnect twice is a no-op
        peer.to(GONE, reason or None)
        self.conns.remove(peer)
        peer.drop_outbox()
        if peer.monitor:
            self.monitoring.remove(peer)
        self.matches.remove_all(peer)
        if peer.starts:
            self.activator.peer_gone(peer)
        # its own calls are forgotten (a late reply is dropped); callers still waiting on it get NoReply
        self.replies.drop_caller(peer)
        self.send_no_replies(self.replies.drop_replier(peer), NO_REPLY_GONE)
        if peer.unique_name:
            for ch in self.registry.release_all(peer):
                self.announce_owner_change(ch)
            if self.conns.unname(peer):  # monitors gave their name up already
                self.name_owner_changed(peer.unique_name, peer.unique_name, "")
            log.info("disconnected %s%s", peer.describe(), f": {reason}" if reason else "",
                     extra=about_peer(DISCONNECTED, peer, reason=reason))  # fmt: skip

    @property
    def pending(self) -> ReplyRegistry:
        """Expected replies (its ``len`` is how many)."""
        return self.replies

    def expire_replies(self, now: float) -> None:
        """Called by the I/O shell with its clock (see ReplyRegistry.expire): callers whose
        reply_timeout passed get NoReply from the bus."""
        self.send_no_replies(self.replies.expire(now), NO_REPLY_TIMEOUT)

    def send_no_replies(self, slots, text: str) -> None:
        """NoReply from the bus to the caller of each of ``slots`` (one message built per caller)."""
        templates: dict = {}
        pack = _U32LE.pack_into
        for slot in slots:
            caller = slot.caller
            if caller.state:  # not ACTIVE
                continue
            tpl = templates.get(caller, False)
            if tpl is False:
                tpl = templates[caller] = error_template(caller.unique_name, E + "NoReply", text)
            if tpl is None:
                self.send_error(caller, slot.serial, E + "NoReply", text)
                continue
            raw = bytearray(tpl[0])
            pack(raw, 8, self.next_serial())
            pack(raw, tpl[1], slot.serial)
            self.send_from_bus(caller, bytes(raw))

    def kill(self, peer: Peer, reason: str) -> None:
        """Disconnect a misbehaving peer, with a log line naming it.

        With an I/O shell attached the disconnect is deferred to it (it runs
        after the current routing pass, so no list is changed mid-iteration);
        the peer takes no further messages in the meantime.
        """
        if peer.state:  # CLOSING or GONE already
            return
        log.warning(
            "disconnecting %s: %s", peer.describe(), reason, extra=about_peer(DISCONNECTED, peer, reason=reason)
        )
        peer.begin_closing(reason)
        if peer.kill is not None:
            peer.kill(reason)
        else:
            self.disconnect(peer, reason)

    # -- message entry ----------------------------------------------------

    def dispatch(self, peer: Peer, msg) -> None:
        h, fds = msg
        if peer.state:  # not ACTIVE: CLOSING (killed during this pass) takes nothing more
            if fds:
                FdRef(fds, self.closing, peer).decref()
            return
        peer.in_messages += 1
        peer.in_bytes += len(h.raw)
        self.messages += 1
        if not fds and peer.unique_name is not None and not peer.monitor:
            self._route(peer, h, None)  # the common case: no fds whose reference must be dropped after routing
            return
        fdref = None
        if fds:
            if self.fd_quota.refuses(peer.account, len(fds)):  # the sender pays: never a receiver
                self._over_fd_share(peer, h, fds)
                return
            fdref = FdRef(fds, self.closing, peer, peer.account)
        try:
            if peer.unique_name is None:
                self._to_monitors(peer, h, fdref)
                if not (h.type == wm.METHOD_CALL and h.destination == DBUS_NAME and h.member == "Hello"
                        and h.interface in (None, DBUS_NAME)):  # fmt: skip
                    self._before_hello(peer, h)
                    return
                self.driver.hello(peer, h)
                return
            if peer.monitor:
                self.kill(peer, "monitors may not send messages")
                return
            self._route(peer, h, fdref)
        finally:
            if fdref is not None:
                fdref.decref()

    def _before_hello(self, peer: Peer, h) -> None:
        """A message other than Hello from a peer that has no name yet ends its connection. One to
        the bus is first answered with dbus-daemon's AccessDenied, which the shell writes before it
        closes (the client learns why at once rather than at its timeout); as dbus-daemon, one to
        anybody else is not answered."""
        if h.destination != DBUS_NAME:
            self.kill(peer, "first message was not Hello")
            return
        self.send_error(peer, h.serial, E + "AccessDenied",
                        "Client tried to send a message other than Hello without being registered")  # fmt: skip
        reason = "first message was not Hello"
        log.warning(
            "disconnecting %s: %s", peer.describe(), reason, extra=about_peer(DISCONNECTED, peer, reason=reason)
        )
        peer.to(CLOSING, reason)  # takes no further messages; unlike kill(), its outbox (the error) is kept
        if peer.kill is not None:
            peer.kill(reason)
        else:
            self.disconnect(peer, reason)

    def _over_fd_share(self, peer: Peer, h, fds) -> None:
        acct = peer.account
        why = (f"uid {acct.uid} holds its share of the broker's fds "
               f"({self.fd_quota.holds(acct)} of {self.fd_quota.share(acct)}: fd share)")  # fmt: skip
        self.stats["limits"] += 1
        log.warning("refused a message with %d fds from %s: %s", len(fds), peer.describe(), why,
                    extra=about_peer(LIMIT, peer, limit="fd_share"))  # fmt: skip
        FdRef(fds, self.closing, peer).decref()
        if h.type == wm.METHOD_CALL and not h.no_reply_expected and peer.unique_name is not None:
            self.send_error(peer, h.serial, E + "LimitsExceeded", why)

    def _route(self, peer: Peer, h, fdref: FdRef | None) -> None:  # noqa: C901
        if fdref is not None and self.fd_vetter is not None:
            try:
                self.fd_vetter(peer, h, fdref.fds)
            except BusError as e:
                log.warning("refused fds from %s: %s", peer.describe(), e.text, extra=about_peer(DENIED, peer))
                if h.type == wm.METHOD_CALL and not h.no_reply_expected:
                    self.send_error(peer, h.serial, e.name, e.text)
                elif h.type == wm.SIGNAL:
                    self.send_error(peer, h.serial, e.name, e.text)
                return
        dest = h.destination
        if dest == DBUS_NAME:
            if h.type == wm.SIGNAL and h.member == "ActivationFailure" and h.interface == ACTIVATOR:
                self._activation_failure(peer, h, fdref)
                return
            self._to_monitors(peer, h, fdref)
            if self.policy is not None:
                err = self.policy_send(peer, h, None, False, fdref)
                if err is not None:
                    self.send_error(peer, h.serial, E + "AccessDenied", err)  # as dbus-daemon, even for no-reply
                    return
            if h.type == wm.METHOD_CALL:
                self.driver.handle(peer, h, fdref)
            return
        if dest is None:
            if h.type == wm.SIGNAL:
                self._broadcast(peer, h, fdref)
            elif h.type == METHOD_CALL:
                # as dbus-daemon: a call to nobody is answered (even with NO_REPLY_EXPECTED), never
                # delivered to match rules
                self._to_monitors(peer, h, fdref)
                iface = h.interface or ""
                self.send_error(peer, h.serial, E + "UnknownMethod", f'Method "{h.member}" with signature '
                                f'"{h.signature}" on interface "{iface}" doesn\'t exist\n')  # fmt: skip
            else:
                self._to_monitors(peer, h, fdref)
                self._to_matching(peer, h, fdref, None, eavesdrop_only=False)
            return
        target = self.peers.get(dest) if dest[0] == ":" else self.registry.owner(dest)  # resolve(), inlined
        if target is None:
            if (h.type == METHOD_CALL or h.type == wm.SIGNAL) and not h.flags & wm.NO_AUTO_START \
                    and self.activator.activatable(dest):  # fmt: skip
                self.activator.auto_start(peer, h, fdref)
                return
            self._to_monitors(peer, h, fdref)
            if h.type == METHOD_RETURN or h.type == ERROR:
                self.stats["dropped_replies"] += 1  # e.g. its caller left before the answer came
            elif h.type == wm.METHOD_CALL and not h.no_reply_expected:
                if h.flags & wm.NO_AUTO_START:
                    self.send_error(peer, h.serial, E + "NameHasNoOwner", f'Name "{dest}" does not exist')
                else:
                    self.send_error(peer, h.serial, E + "ServiceUnknown",
                                    f"The name {dest} was not provided by any .service files")  # fmt: skip
            return
        if h.type == METHOD_RETURN or h.type == ERROR:
            self._route_reply(peer, h, fdref, target)
            return
        self._unicast(peer, h, fdref, target)

    def _activation_failure(self, peer: Peer, h, fdref) -> None:
        """systemd's ActivationFailure signal to the bus. As dbus-daemon, the errors it causes reach
        monitors before the signal itself."""
        if self.policy is not None:
            err = self.policy_send(peer, h, None, False, fdref)
            if err is not None:
                self._to_monitors(peer, h, fdref)
                self.send_error(peer, h.serial, E + "AccessDenied", err)
                return
        self.activator.systemd_failure(peer, h)
        self._to_monitors(peer, h, fdref)

    def show_monitors(self, peer: Peer | None, h, fdref) -> None:
        """Monitors get their copy of ``h`` now (activation: a message whose delivery waits)."""
        self._to_monitors(peer, h, fdref)

    def deliver_queued(self, peer: Peer, h, fdref, target: Peer) -> None:
        """A message that waited for ``target`` to be started: routed now, through the same checks as any
        (monitors saw it when it was sent)."""
        self._unicast(peer, h, fdref, target, True)  # seen

    def policy_activation(self, peer: Peer, h, name: str, fdref) -> str | None:
        """May ``peer`` make the bus start ``name`` for ``h``? The denial text, or None."""
        return self.policy.mediate_activation(peer, h, name, fdref)

    def resolve(self, name: str) -> Peer | None:
        if name.startswith(":"):
            return self.peers.get(name)
        return self.registry.owner(name)

    def owner_unique_name(self, name: str) -> str | None:
        if name == DBUS_NAME:
            return DBUS_NAME
        p = self.resolve(name)
        return p.unique_name if p is not None else None

    # -- unicast / replies --------------------------------------------------

    def _unicast(self, peer: Peer, h, fdref, target: Peer, seen: bool = False) -> None:  # noqa: C901
        is_call = h.type == METHOD_CALL
        wants_reply = is_call and not h.flags & NO_REPLY_EXPECTED
        if self.policy is not None:
            err = self.policy_send(peer, h, target, False, fdref)
            if err is not None:
                # as dbus-daemon: monitors see the message, then the error; the sender of any denied
                # unicast message is told (no-reply calls, signals too)
                if self.monitors and not seen:
                    self._to_monitors(peer, h, fdref, None, target)
                self.send_error(peer, h.serial, E + "AccessDenied", err)
                return
        if fdref is not None and not target.unix_fds:
            if wants_reply:
                self.send_error(peer, h.serial, E + "NotSupported",
                                "the recipient does not accept Unix fds")  # fmt: skip
            return
        if wants_reply and peer.replies_pending >= self.limits.max_replies_per_connection:
            self.stats["limits"] += 1
            log.warning("limit max_replies_per_connection hit by %s", peer.describe(),
                        extra=about_peer(LIMIT, peer, limit="max_replies_per_connection"))  # fmt: skip
            self.send_error(peer, h.serial, E + "LimitsExceeded",
                            "The maximum number of pending replies per connection has been reached")  # fmt: skip
            return
        bufs = h.forward(peer.unique_name)
        nbytes = sum(map(len, bufs))
        why = self._cannot_queue(peer, target, nbytes, fdref)
        if why is not None:
            self.stats["limits"] += 1
            log.warning("cannot queue message from %s to %s: %s", peer.describe(), target.describe(), why,
                        extra=about_peer(LIMIT, peer, destination=target.unique_name))  # fmt: skip
            if is_call:
                if wants_reply:
                    self.send_error(peer, h.serial, E + "LimitsExceeded", why)
            else:
                self.kill(target, f"not reading its messages ({why})")
            return
        self._push(target, bufs, nbytes, fdref, peer)
        if wants_reply:
            self.replies.add(peer, h.serial, target, self.limits.reply_timeout)
        if self.monitors and not seen:
            self._to_monitors(peer, h, fdref, bufs, target)
        if self.eavesdroppers:
            self._to_matching(peer, h, fdref, bufs, eavesdrop_only=True, skip=target)

    def _route_reply(self, peer: Peer, h, fdref, target: Peer) -> None:
        requested = self.replies.take(target, h.reply_serial, peer)
        if self.policy is not None and (requested or self.policy.policy is not None):
            # as dbus-daemon: an unrequested reply is up to the XML policy (only send/receive_requested_reply=
            # "false" rules allow one), and its sender is told when it is denied; without XML rules it is dropped
            err = self.policy_send(peer, h, target, requested, fdref)
            if err is not None:
                if self.monitors:  # as dbus-daemon: they see the reply, then why it went nowhere
                    self._to_monitors(peer, h, fdref, None, target)
                if not requested:
                    self.send_error(peer, h.serial, E + "AccessDenied", err)
                elif self.monitors:
                    self._to_monitors_error(peer, h, E + "AccessDenied", err)
                return
        elif not requested:
            self.stats["dropped_replies"] += 1
            log.info("dropped unexpected reply from %s to %s (reply_serial %d)",
                     peer.describe(), target.describe(), h.reply_serial)  # fmt: skip
            return
        if fdref is not None and not target.unix_fds:
            return
        bufs = h.forward(peer.unique_name)
        nbytes = sum(map(len, bufs))
        why = self._cannot_queue(peer, target, nbytes, fdref)
        if why is not None:
            self.kill(target, f"not reading its replies ({why})")
            return
        self._push(target, bufs, nbytes, fdref, peer)
        if self.monitors:
            self._to_monitors(peer, h, fdref, bufs, target)
        if self.eavesdroppers:
            self._to_matching(peer, h, fdref, bufs, eavesdrop_only=True, skip=target)

    def policy_send(self, peer, h, target, requested_reply, fdref, eavesdrop=False) -> str | None:
        """Policy hook: the denial text, or None if allowed (see broker.access)."""
        return self.policy.mediate_send(self, peer, h, target, requested_reply, fdref, eavesdrop)

    def _cannot_queue(self, sender: Peer | None, target: Peer, nbytes: int, fdref) -> str | None:
        lim = self.limits
        if target.out_bytes + nbytes > lim.max_outgoing_bytes:
            return f"outgoing queue of {target.unique_name} is full (max_outgoing_bytes)"
        if target.account.outgoing_bytes + nbytes > lim.max_outgoing_bytes_per_user:
            return f"outgoing queues of uid {target.creds.uid} are full (max_outgoing_bytes_per_user)"
        if fdref is not None and target.out_fds + len(fdref.fds) > lim.max_outgoing_unix_fds:
            return f"{target.unique_name} has too many fds queued (max_outgoing_unix_fds)"
        if fdref is not None and sender is not None:
            if sender.account.inflight_fds + len(fdref.fds) > lim.max_inflight_fds_per_user:
                return f"uid {sender.creds.uid} has too many fds in flight (max_inflight_fds_per_user)"
        return None

    def _push(self, target: Peer, bufs, nbytes, fdref, sender: Peer | None) -> None:
        if target.state:  # CLOSING (killed during this pass): takes nothing; a caller gets NoReply when it goes
            return
        owner = None
        if fdref is not None:
            fdref.incref()
            owner = sender.account if sender is not None else None
        target.enqueue(OutItem(bufs, nbytes, fdref, owner))
        target.out_messages += 1
        if target.wake is not None:
            target.wake(target)

    # -- broadcast / matching ---------------------------------------------

    def _broadcast(self, peer: Peer, h, fdref) -> None:
        self.stats["broadcasts"] += 1
        bufs = h.forward(peer.unique_name)
        self._to_monitors(peer, h, fdref, bufs)
        self._to_matching(peer, h, fdref, bufs, eavesdrop_only=False)

    def _to_matching(self, peer, h, fdref, bufs, *, eavesdrop_only: bool, skip=None) -> None:  # noqa: C901
        sender_name = peer.unique_name if peer is not None else DBUS_NAME
        body = _LazyBody(h)
        buckets = self.matches.buckets(h, sender_name, body, eavesdrop_only)
        if not buckets:
            return
        done = set()
        if skip is not None:
            done.add(skip)
        nbytes = 0
        for bucket in buckets:
            for rule in tuple(bucket):  # a peer killed on the way (no I/O shell) leaves its buckets
                target = rule.owner
                if target in done or target.state:  # not ACTIVE
                    continue
                if eavesdrop_only and not rule.eavesdrop:
                    continue
                if h.destination is not None and not rule.eavesdrop and h.destination != target.unique_name:
                    continue
                if not rule_hits(rule, h, self.owner_unique_name, sender_name, body):
                    continue
                done.add(target)
                if fdref is not None and not target.unix_fds:
                    if self.monitors and peer is not None:  # as dbus-daemon: monitors are told
                        self._to_monitors_error(peer, h, E + "NotSupported",
                                                f"broadcast cannot be delivered to {target.unique_name} "
                                                "because it does not support receiving Unix fds")  # fmt: skip
                    continue
                if self.policy is not None:
                    if peer is None:
                        err = self.policy.mediate_from_bus(h, target)
                        if err is not None:
                            if self.monitors:
                                self._to_monitors_error(None, h, E + "AccessDenied", err)
                            continue
                    else:
                        eaves = h.destination is not None and h.destination != target.unique_name
                        err = self.policy_send(peer, h, target, False, fdref, eaves)
                        if err is not None:
                            if self.monitors:  # as dbus-daemon: a denied copy is an AccessDenied they see
                                self._to_monitors_error(peer, h, E + "AccessDenied", err)
                            continue
                if bufs is None:
                    sender = peer.unique_name if peer is not None else DBUS_NAME
                    bufs = h.forward(sender)
                nbytes = nbytes or sum(map(len, bufs))
                why = self._cannot_queue(peer, target, nbytes, fdref)
                if why is not None:
                    self.kill(target, f"cannot take its signals ({why})")
                    continue
                self._push(target, bufs, nbytes, fdref, peer)

    def _to_monitors(self, peer, h, fdref, bufs=None, recipient: Peer | None = None) -> None:
        """Copies of ``h`` to the monitors that want it; ``recipient``: the connection it is addressed
        to (what a monitor's destination= rule is compared with), None for the bus or a broadcast."""
        if not self.monitors:
            return
        sender_name = peer.unique_name if peer is not None else DBUS_NAME
        to = recipient.unique_name if recipient is not None else None
        for mon in self.monitoring.wanting(h, sender_name, _LazyBody(h), self.owner_unique_name, to):
            if bufs is None:
                sender = peer.unique_name if peer is not None else DBUS_NAME
                bufs = h.forward(sender)
            nbytes = sum(map(len, bufs))
            if fdref is not None and not mon.unix_fds:
                continue
            if self._cannot_queue(None, mon, nbytes, fdref) is not None:
                self.kill(mon, "monitor cannot keep up")
                continue
            self._push(mon, bufs, nbytes, fdref, None)

    def _to_monitors_error(self, peer: Peer | None, h, name: str, text: str) -> None:
        """What dbus-daemon shows monitors when a copy of ``h`` is not delivered and its sender is not
        told (a denied broadcast or eavesdropped copy, a denied requested reply, a message from the
        bus itself that the receiver's policy refuses): the error reply the bus would have sent
        ``peer`` (None: the bus, which then addresses it to itself), built for the monitors only."""
        to = peer.unique_name if peer is not None else DBUS_NAME
        raw = wm.error_message(self.next_serial(), h.serial, to, name, text)
        self._to_monitors(None, wm.HeaderView(memoryview(raw)), None, [raw], peer)

    def add_match(self, peer: Peer, rule: MatchRule) -> None:
        self.matches.add(peer, rule)

    def remove_match(self, peer: Peer, rule: MatchRule) -> bool:
        """RemoveMatch: one of ``peer``'s rules equal to ``rule`` goes; False if it has none."""
        return self.matches.remove(peer, rule)

    # -- messages from the bus itself ---------------------------------------

    def next_serial(self) -> int:
        self.serial = self.serial % 0xFFFFFFFF + 1
        return self.serial

    def send_from_bus(self, target: Peer, raw: bytes, seen: bool = False) -> None:
        """Queue a bus-originated message (also shown to monitors, unless they ``seen`` it already)."""
        bufs = [raw]
        h = wm.HeaderView(memoryview(raw)) if self.monitors or self.policy is not None else None
        if self.monitors and not seen:
            self._to_monitors(None, h, None, bufs, target)
        if target.state:  # not ACTIVE
            return
        if self.policy is not None:
            err = self.policy.mediate_from_bus(h, target)
            if err is not None:
                if self.monitors:  # as dbus-daemon: they are shown why it went nowhere
                    self._to_monitors_error(None, h, E + "AccessDenied", err)
                return
        if self._cannot_queue(None, target, len(raw), None) is not None:
            self.kill(target, "outgoing queue full")
            return
        self._push(target, bufs, len(raw), None, None)

    def send_error(self, target: Peer, reply_to: int, name: str, text: str) -> None:
        raw = wm.error_message(self.next_serial(), reply_to, target.unique_name, name, text)
        self.send_from_bus(target, raw)

    def send_reply_fds(self, target: Peer, reply_to: int, signature: str, body: tuple, fds: list[int]) -> None:
        """A driver reply carrying fds (which the bus owns and closes once sent)."""
        raw = wm.build_message(wm.METHOD_RETURN, self.next_serial(), reply_serial=reply_to,
                               destination=target.unique_name, sender=DBUS_NAME, signature=signature,
                               body=body, flags=wm.NO_REPLY_EXPECTED, unix_fds=len(fds))  # fmt: skip
        fdref = FdRef(fds, self.closing)
        h = wm.HeaderView(memoryview(raw))
        try:
            if self.monitors:
                self._to_monitors(None, h, fdref, [raw], target)
            if self.policy is not None and self.policy.mediate_from_bus(h, target) is not None:
                return
            if not target.state:  # ACTIVE
                self._push(target, [raw], len(raw), fdref, None)
        finally:
            fdref.decref()

    def send_reply(self, target: Peer, reply_to: int, signature: str = "", body=()) -> None:
        raw = wm.method_return(self.next_serial(), reply_to, target.unique_name, signature, body)
        self.send_from_bus(target, raw)

    def bus_signal(self, member: str, signature: str, body: tuple, destination: Peer | None = None) -> None:
        raw = wm.signal_message(self.next_serial(), DBUS_PATH, DBUS_NAME, member, signature, body,
                                destination=destination.unique_name if destination else None)  # fmt: skip
        if destination is not None:
            self.send_from_bus(destination, raw)
            return
        h = wm.HeaderView(memoryview(raw))
        bufs = [raw]
        self._to_monitors(None, h, None, bufs)
        self._to_matching(None, h, None, bufs, eavesdrop_only=False)

    def name_owner_changed(self, name: str, old: str, new: str) -> None:
        self.bus_signal("NameOwnerChanged", "sss", (name, old, new))

    def announce_owner_change(self, ch) -> None:
        """NameLost / NameOwnerChanged / NameAcquired for one OwnerChange of the name registry."""
        old = ch.old.unique_name if ch.old is not None else ""
        new = ch.new.unique_name if ch.new is not None else ""
        if ch.old is not None and not ch.old.state:  # ACTIVE
            self.bus_signal("NameLost", "s", (ch.name,), destination=ch.old)
        self.name_owner_changed(ch.name, old, new)
        if ch.new is not None:
            self.bus_signal("NameAcquired", "s", (ch.name,), destination=ch.new)
            if ch.old is None and self.activator.pending:
                self.activator.name_owned(ch.name, ch.new)
