"""The bus's policy hook: turns routing events into policy questions.

The router calls ``mediate_send`` for every delivery (each broadcast
recipient separately), ``mediate_own`` on RequestName and ``check_connect``
after authentication. A denial returns the text of the AccessDenied error
and is logged with the rule that decided it.
"""

import logging

from ..bus.log_fields import DENIED, about_peer
from .policy import DRIVER, MsgInfo, Policy

log = logging.getLogger("sealbus.policy")


def _names(peer) -> set[str] | None:
    if peer is None:
        return None
    out = set(peer.names)
    if peer.unique_name:
        out.add(peer.unique_name)
    return out


class BusPolicy:
    """The XML policy (None: it allows everything) plus SELinux mediation (None when SELinux is off)."""

    def __init__(self, policy: Policy | None, selinux=None):
        self.policy = policy
        self.selinux = selinux  # broker.access.selinux.SELinuxMediator, or None
        self.xml_allows_all = policy is None or policy.allows_all_messages
        self.fast = self.xml_allows_all and selinux is None

    def with_xml(self, policy: Policy | None) -> "BusPolicy":
        """The same SELinux mediation over a reloaded XML policy."""
        return BusPolicy(policy, self.selinux)

    def check_connect(self, creds):
        return self.policy is None or self.policy.check_connect(creds)

    def mediate_own(self, bus, peer, name: str) -> str | None:
        d = self.policy.check_own(peer.creds, name) if self.policy is not None else None
        if d is not None and not d.allowed:
            where = f" (rule {d.rule.where})" if d.rule else " (no rule allows it)"
            return f'Connection "{peer.unique_name}" is not allowed to own the service "{name}"{where}'
        if self.selinux is not None:
            return self.selinux.check_own(peer, name)
        return None

    def mediate_send(self, bus, sender, h, target, requested_reply: bool, fdref, eavesdrop: bool = False):
        # an unrequested reply is never "allowed by everything": allow rules match only requested replies
        # unless they say send/receive_requested_reply="false"
        unrequested = not requested_reply and h.type in (2, 3)
        if self.fast and not unrequested:
            return None
        if not self.xml_allows_all or (unrequested and self.policy is not None):
            err = self._xml_send(sender, h, target, requested_reply, fdref, eavesdrop)
            if err is not None:
                return err
        if self.selinux is not None:
            return self.selinux.check_send(sender, target, h)
        return None

    def mediate_activation(self, sender, h, name: str, fdref) -> str | None:
        """May ``sender``'s ``h`` make the bus start the service that provides ``name``? Asked before
        anything is started (as dbus-daemon): the send rules as if the service already owned ``name``
        and no other name, and SELinux send_msg to the bus's own label (the service has none yet). The
        receive rules are checked when the message is delivered."""
        if self.fast:
            return None
        if not self.xml_allows_all:
            msg = MsgInfo(h.type, h.path, h.interface, h.member, h.error_name, h.destination,
                          sender.unique_name, len(fdref.fds) if fdref is not None else 0)  # fmt: skip
            d = self.policy.check_send(sender.creds, msg, {name}, False)
            if not d.allowed:
                return self._denied("send", d, msg, sender, None, False)
        if self.selinux is not None:
            return self.selinux.check_send(sender, None, h)
        return None

    def _xml_send(self, sender, h, target, requested_reply: bool, fdref, eavesdrop: bool):
        msg = MsgInfo(h.type, h.path, h.interface, h.member, h.error_name, h.destination,
                      sender.unique_name, len(fdref.fds) if fdref is not None else 0)  # fmt: skip
        d = self.policy.check_send(sender.creds, msg, _names(target), requested_reply, eavesdrop)
        if d.allowed and target is not None:
            d2 = self.policy.check_receive(target.creds, msg, _names(sender), requested_reply, eavesdrop)
            if not d2.allowed:
                return self._denied("receive", d2, msg, sender, target, requested_reply)
        if not d.allowed:
            return self._denied("send", d, msg, sender, target, requested_reply)
        return None

    def explicitly_allows(self, sender, path: str | None, interface: str, member: str) -> bool | None:
        """Whether the XML policy explicitly lets ``sender`` call ``interface.member`` on the bus driver:
        the call is allowed and, of the rules that match it, the last one naming ``interface`` is an allow
        (a catch-all such as send_destination="*" was not written for it and does not count, either way).
        None: the bus has no XML policy. For driver methods that show other peers' data (Debug.Stats),
        on top of the usual send check."""
        if self.policy is None:
            return None
        msg = MsgInfo(1, path, interface, member, None, DRIVER, sender.unique_name, 0)
        d = self.policy.check_send(sender.creds, msg, None, False)
        named = [r for r in d.matched if r.interface == interface]
        return d.allowed and bool(named) and named[-1].allow

    def mediate_from_bus(self, h, target) -> str | None:
        """Receive check for a message the bus driver itself sends (as dbus-daemon: replies count as
        requested, and a denied message is dropped, not answered)."""
        if self.xml_allows_all:
            return None
        msg = MsgInfo(h.type, h.path, h.interface, h.member, h.error_name, h.destination, None, 0)
        requested = h.type in (2, 3)
        d = self.policy.check_receive(target.creds, msg, None, requested)
        if not d.allowed:
            return self._denied("receive", d, msg, None, target, requested)
        return None

    def _denied(self, what, d, msg: MsgInfo, sender, target, requested_reply) -> str:
        tname = target.unique_name if target is not None else "org.freedesktop.DBus"
        tdesc = target.describe() if target is not None else "the bus driver"
        sname = sender.unique_name if sender is not None else "org.freedesktop.DBus"
        sdesc = sender.describe() if sender is not None else "the bus driver"
        rule = d.rule.where if d.rule else "no rule allows it"
        text = (
            f'Rejected {what} message, {len(d.matched)} matched rules; type="{_TYPES.get(msg.type)}", '
            f'sender="{sname}" interface="{msg.interface or "(unset)"}" '
            f'member="{msg.member or "(unset)"}" error name="{msg.error_name or "(unset)"}" '
            f'requested_reply="{int(requested_reply)}" destination="{msg.destination or tname}" '
            f"(decided by {rule})"
        )
        subject = sender if sender is not None else target  # the peer the line is about: who sent, or who receives
        log.warning("denied %s from %s to %s: %s", what, sdesc, tdesc, text,
                    extra=about_peer(DENIED, subject, denied=what, destination=tname, interface=msg.interface,
                                     member=msg.member))  # fmt: skip
        return text


_TYPES = {1: "method_call", 2: "method_return", 3: "error", 4: "signal"}
