"""The bus driver: ``org.freedesktop.DBus`` and friends, answered by the bus itself."""

import logging

from ..wire import message as wm
from ..wire import name_syntax as wn
from ..wire.errors import WireError
from ..wire.marshal import Variant
from . import names as nm
from .common import DBUS_NAME, DBUS_PATH, BusError
from .log_fields import CONNECTED, DENIED, LIMIT, about_peer
from .match import MatchRuleInvalid, parse_match_rule

log = logging.getLogger("sealbus.driver")

I_DBUS = DBUS_NAME
I_MONITORING = "org.freedesktop.DBus.Monitoring"
I_STATS = "org.freedesktop.DBus.Debug.Stats"
I_PEER = "org.freedesktop.DBus.Peer"
I_INTROSPECT = "org.freedesktop.DBus.Introspectable"
I_PROPS = "org.freedesktop.DBus.Properties"
I_PAYLOAD = "org.sealbus.Payload1"

# interface -> member -> (in signature, out signature, arg names)
METHODS = {
    I_DBUS: {
        "Hello": ("", "s"), "RequestName": ("su", "u"), "ReleaseName": ("s", "u"),
        "StartServiceByName": ("su", "u"), "UpdateActivationEnvironment": ("a{ss}", ""),
        "NameHasOwner": ("s", "b"), "ListNames": ("", "as"), "ListActivatableNames": ("", "as"),
        "AddMatch": ("s", ""), "RemoveMatch": ("s", ""), "GetNameOwner": ("s", "s"),
        "ListQueuedOwners": ("s", "as"), "GetConnectionUnixUser": ("s", "u"),
        "GetConnectionUnixProcessID": ("s", "u"), "GetAdtAuditSessionData": ("s", "ay"),
        "GetConnectionSELinuxSecurityContext": ("s", "ay"), "ReloadConfig": ("", ""),
        "GetId": ("", "s"), "GetConnectionCredentials": ("s", "a{sv}"),
    },
    I_MONITORING: {"BecomeMonitor": ("asu", "")},
    I_STATS: {"GetStats": ("", "a{sv}"), "GetConnectionStats": ("s", "a{sv}"),
              "GetAllMatchRules": ("", "a{sas}")},
    I_PEER: {"Ping": ("", ""), "GetMachineId": ("", "s")},
    I_INTROSPECT: {"Introspect": ("", "s")},
    I_PROPS: {"Get": ("ss", "v"), "GetAll": ("s", "a{sv}"), "Set": ("ssv", "")},
    I_PAYLOAD: {"Claim": ("s", "ht")},
}  # fmt: skip
# As dbus-daemon (driver.c, INTERFACE_FLAG_ANY_PATH): these interfaces are answered at any object path,
# every other one only at the canonical path (elsewhere it is an unknown interface) ...
ANY_PATH_INTERFACES = {I_DBUS, I_INTROSPECT, I_PEER}
# ... and of org.freedesktop.DBus, the newer privileged method only at the canonical path (AccessDenied elsewhere)
CANONICAL_ONLY = {"UpdateActivationEnvironment"}
SIGNALS = {"NameOwnerChanged": "sss", "NameLost": "s", "NameAcquired": "s"}
FEATURES = ["HeaderFiltering"]
INTERFACES = [I_MONITORING, I_STATS, I_PAYLOAD]


def _introspection_xml() -> str:
    out = [
        '<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"',
        '"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">',
        "<node>",
    ]
    from ..wire.signature import split_signature

    for iface, methods in METHODS.items():
        out.append(f'  <interface name="{iface}">')
        for member, (ins, outs) in methods.items():
            out.append(f'    <method name="{member}">')
            out.extend(f'      <arg direction="in" type="{t}"/>' for t in split_signature(ins))
            out.extend(f'      <arg direction="out" type="{t}"/>' for t in split_signature(outs))
            out.append("    </method>")
        if iface == I_DBUS:
            for sig, args in SIGNALS.items():
                out.append(f'    <signal name="{sig}">')
                out.extend(f'      <arg type="{t}"/>' for t in args)
                out.append("    </signal>")
            out.append('    <property name="Features" type="as" access="read"/>')
            out.append('    <property name="Interfaces" type="as" access="read"/>')
        if iface == I_PAYLOAD:
            out.append('    <property name="MountPoint" type="s" access="read"/>')
        out.append("  </interface>")
    out.append("</node>")
    return "\n".join(out) + "\n"


INTROSPECTION = _introspection_xml()


class Driver:
    def __init__(self, bus):
        self.bus = bus

    # Hello is special: it is the only call a peer without a name may make.
    def hello(self, peer, h) -> None:
        bus = self.bus
        bus.conns.name(peer)
        log.info("connected %s", peer.describe(), extra=about_peer(CONNECTED, peer))
        bus.send_reply(peer, h.serial, "s", (peer.unique_name,))
        bus.name_owner_changed(peer.unique_name, "", peer.unique_name)
        bus.bus_signal("NameAcquired", "s", (peer.unique_name,), destination=peer)

    def handle(self, peer, h, fdref) -> None:
        bus = self.bus
        member = h.member
        wants_reply = not h.no_reply_expected
        try:
            iface, spec = self.lookup(h.interface, member, h.path == DBUS_PATH)
            if member in CANONICAL_ONLY and iface == I_DBUS and h.path != DBUS_PATH:
                where = f"the canonical object path '{DBUS_PATH}'"
                raise BusError("AccessDenied", f"Method '{member}' is only available at {where}")
            if h.signature != spec[0]:
                raise BusError("InvalidArgs",
                               f"Call to {member} has wrong args ({h.signature}, expected {spec[0]})")  # fmt: skip
            try:
                args = h.unmarshal_body() if h.signature else ()
            except WireError as e:
                raise BusError("InvalidArgs", f"malformed arguments: {e}")
            fn = getattr(self, f"m_{member}")
            result = fn(peer, h, *args)
        except BusError as e:
            if wants_reply:
                bus.send_error(peer, h.serial, e.name, e.text)
            return
        if result is NotImplemented:  # answered later (asynchronous method)
            return
        if wants_reply:
            out = spec[1]
            bus.send_reply(peer, h.serial, out, result if out else ())

    @staticmethod
    def lookup(iface, member, canonical: bool):
        """(interface, spec) of the method a call names, as dbus-daemon finds it: an interface
        answered only at the canonical path does not exist elsewhere; no interface means the first
        one with that member. UnknownInterface or UnknownMethod otherwise."""
        found = False
        for name, methods in METHODS.items():
            if iface is not None and iface != name:
                continue
            if not canonical and name not in ANY_PATH_INTERFACES:
                continue
            found = True
            spec = methods.get(member)
            if spec is not None:
                return name, spec
        text = f"{DBUS_NAME} does not understand message {member}"
        raise BusError("UnknownMethod" if found else "UnknownInterface", text)

    # -- helpers ------------------------------------------------------------

    def _peer_for(self, name: str):
        if name == DBUS_NAME:
            return self.bus.self_peer
        if not wn.is_bus_name(name):
            raise BusError("InvalidArgs", f"invalid bus name {name!r}")
        p = self.bus.resolve(name)
        if p is None:
            raise BusError("NameHasNoOwner", f"Could not get owner of name '{name}': no such name")
        return p

    # -- org.freedesktop.DBus ---------------------------------------------------

    def m_Hello(self, peer, h):
        raise BusError("Failed", "Already handled an Hello message")

    def m_RequestName(self, peer, h, name, flags):
        bus = self.bus
        if not wn.is_well_known_name(name):
            if name.startswith(":"):
                raise BusError("InvalidArgs", f"Cannot acquire a service starting with ':' such as \"{name}\"")
            raise BusError("InvalidArgs", f'Requested bus name "{name}" is not valid')
        if name == DBUS_NAME:
            raise BusError("InvalidArgs", f'Connection is not allowed to own the service "{name}" '
                           "because it is reserved for D-Bus' use only")  # fmt: skip
        # the unique name counts too, as in dbus-daemon
        if name not in peer.names and len(peer.names) + 1 >= bus.limits.max_names_per_connection:
            log.warning("limit max_names_per_connection hit by %s", peer.describe(),
                        extra=about_peer(LIMIT, peer, limit="max_names_per_connection"))  # fmt: skip
            raise BusError("LimitsExceeded", f"{peer.unique_name} owns or queues for too many names")
        if bus.policy is not None:
            err = bus.policy.mediate_own(bus, peer, name)
            if err is not None:
                log.warning(
                    "denied own %s to %s: %s", name, peer.describe(), err, extra=about_peer(DENIED, peer, own=name)
                )
                raise BusError("AccessDenied", err)
        result, changes = bus.registry.request(name, peer, flags)
        for ch in changes:
            bus.announce_owner_change(ch)
        return (result,)

    def m_ReleaseName(self, peer, h, name):
        if not wn.is_bus_name(name):
            raise BusError("InvalidArgs", f'Given bus name "{name}" is not valid')
        if name.startswith(":"):
            raise BusError("InvalidArgs", f"Cannot release a service starting with ':' such as \"{name}\"")
        if name == DBUS_NAME:
            raise BusError("InvalidArgs", f'Cannot release the service "{name}" because it is owned by the bus')
        result, changes = self.bus.registry.release(name, peer)
        for ch in changes:
            self.bus.announce_owner_change(ch)
        return (result,)

    def m_StartServiceByName(self, peer, h, name, flags):
        return self.bus.activator.start_by_name(peer, h, name)

    def m_UpdateActivationEnvironment(self, peer, h, env):
        if not self.privileged(peer):
            raise BusError("AccessDenied", "only the bus owner may update the activation environment")
        if self.bus.activator.via_launcher:
            # as dbus-daemon with its setuid helper: services the root launcher starts as other users get a
            # clean environment, never one a client (or the bus's own uid) chose
            raise BusError("AccessDenied", "Cannot change activation environment on a system bus.")
        self.bus.activator.update_environment(env)
        return ()

    def bus_owner_uid(self) -> int:
        """The uid the bus runs as (the shell passes the process's credentials to Bus)."""
        return self.bus.self_peer.creds.uid

    def privileged(self, peer) -> bool:
        """Root or the uid the bus runs as (dbus-daemon's bus_driver_check_caller_is_privileged)."""
        return peer.creds.uid in (0, self.bus_owner_uid())

    def m_NameHasOwner(self, peer, h, name):
        if not wn.is_bus_name(name):
            raise BusError("InvalidArgs", f"invalid bus name {name!r}")
        return (name == DBUS_NAME or self.bus.resolve(name) is not None,)

    def m_ListNames(self, peer, h):
        return ([DBUS_NAME, *self.bus.registry.names(), *self.bus.peers],)

    def m_ListActivatableNames(self, peer, h):
        catalog = self.bus.catalog
        return ([DBUS_NAME, *(catalog.names() if catalog is not None else ())],)

    def m_AddMatch(self, peer, h, text):
        if len(peer.matches) >= self.bus.limits.max_match_rules_per_connection:
            log.warning("limit max_match_rules_per_connection hit by %s", peer.describe(),
                        extra=about_peer(LIMIT, peer, limit="max_match_rules_per_connection"))  # fmt: skip
            raise BusError("LimitsExceeded", "Connection has too many match rules")
        try:
            rule = parse_match_rule(text)
        except MatchRuleInvalid as e:
            raise BusError("MatchRuleInvalid", str(e))
        if rule.eavesdrop and self.bus.policy is not None and not self.privileged(peer):
            # as dbus-daemon (since 1.11.16): the same restriction as BecomeMonitor
            raise BusError("AccessDenied", f"Connection {peer.unique_name} (uid {peer.creds.uid}) is not "
                           "privileged for AddMatch with eavesdrop='true' (only root and the bus's uid)")  # fmt: skip
        self.bus.add_match(peer, rule)
        return ()

    def m_RemoveMatch(self, peer, h, text):
        try:
            rule = parse_match_rule(text)
        except MatchRuleInvalid as e:
            raise BusError("MatchRuleInvalid", str(e))
        if not self.bus.remove_match(peer, rule):
            raise BusError("MatchRuleNotFound", "The given match rule wasn't found and can't be removed")
        return ()

    def m_GetNameOwner(self, peer, h, name):
        if name == DBUS_NAME:
            return (DBUS_NAME,)
        return (self._peer_for(name).unique_name,)

    def m_ListQueuedOwners(self, peer, h, name):
        if name == DBUS_NAME:
            return ([DBUS_NAME],)
        if not wn.is_bus_name(name):
            raise BusError("InvalidArgs", f"invalid bus name {name!r}")
        if name.startswith(":"):
            p = self.bus.peers.get(name)
            owners = [p] if p else []
        else:
            owners = self.bus.registry.queued_owners(name)
        if not owners:
            raise BusError("NameHasNoOwner", f"Could not get owners of name '{name}': no such name")
        return ([p.unique_name for p in owners],)

    def m_GetConnectionUnixUser(self, peer, h, name):
        return (self._peer_for(name).creds.uid,)

    def m_GetConnectionUnixProcessID(self, peer, h, name):
        p = self._peer_for(name)
        if not p.creds.pid:
            raise BusError("UnixProcessIdUnknown", "Could not determine the process ID")
        return (p.creds.pid,)

    def m_GetConnectionCredentials(self, peer, h, name):
        p = self._peer_for(name)
        c = p.creds
        out = {"UnixUserID": Variant("u", c.uid), "UnixGroupIDs": Variant("au", list(c.gids))}
        if c.pid:
            out["ProcessID"] = Variant("u", c.pid)
        if c.label:
            out["LinuxSecurityLabel"] = Variant("ay", c.label.encode() + b"\0")
        return (out,)

    def m_GetConnectionSELinuxSecurityContext(self, peer, h, name):
        p = self._peer_for(name)
        if not p.creds.label:
            raise BusError("SELinuxSecurityContextUnknown", "Could not determine security context")
        return (p.creds.label.encode(),)

    def m_GetAdtAuditSessionData(self, peer, h, name):
        self._peer_for(name)
        raise BusError("NotSupported", "Solaris ADT audit data is not available on this system")

    def m_ReloadConfig(self, peer, h):
        # as dbus-daemon, any caller the policy lets through may ask (the system policy allows it); the
        # reload runs outside the routing pass and the caller is answered when it is done
        if self.bus.reload_hook is None:
            return ()
        self.bus.reload_hook(peer, None if h.no_reply_expected else h.serial)
        return NotImplemented

    def m_GetId(self, peer, h):
        return (self.bus.guid,)

    # -- other interfaces ------------------------------------------------------

    def m_BecomeMonitor(self, peer, h, rules, flags):
        if flags != 0:
            raise BusError("InvalidArgs", "BecomeMonitor flags must be 0")
        if not self.privileged(peer):
            raise BusError("AccessDenied", "only root or the bus owner may become a monitor")
        try:
            parsed = [parse_match_rule(r) for r in rules]
        except MatchRuleInvalid as e:
            raise BusError("MatchRuleInvalid", str(e))
        bus = self.bus
        bus.send_reply(peer, h.serial)
        for ch in bus.registry.release_all(peer):
            bus.announce_owner_change(ch)
        bus.matches.remove_all(peer)
        bus.bus_signal("NameLost", "s", (peer.unique_name,), destination=peer)
        bus.name_owner_changed(peer.unique_name, peer.unique_name, "")
        bus.conns.unname(peer)
        bus.monitoring.add(peer, parsed)
        log.info("monitor %s with %d rules", peer.describe(), len(parsed))
        return NotImplemented

    def m_Ping(self, peer, h):
        return ()

    def m_GetMachineId(self, peer, h):
        return (self.bus.machine_id,)

    def m_Introspect(self, peer, h):
        return (INTROSPECTION,)

    def _props(self, iface):
        if iface == I_PAYLOAD:  # where clients find the payload fs of *this* bus ("" when it serves none)
            payload = self.bus.payload
            return {"MountPoint": Variant("s", getattr(payload, "mount", None) or "")}
        if iface != I_DBUS:
            raise BusError("UnknownInterface", f'Interface "{iface}" not found')
        return {"Features": Variant("as", self.bus.features), "Interfaces": Variant("as", INTERFACES)}

    def m_Get(self, peer, h, iface, prop):
        props = self._props(iface)
        if prop not in props:
            raise BusError("UnknownProperty", f'Property "{iface}.{prop}" not found')
        return (props[prop],)

    def m_GetAll(self, peer, h, iface):
        return (self._props(iface),)

    def m_Set(self, peer, h, iface, prop, value):
        if prop not in self._props(iface):
            raise BusError("UnknownProperty", f'Property "{iface}.{prop}" not found')
        raise BusError("PropertyReadOnly", f"Property '{iface}.{prop}' cannot be set")

    def _check_stats_reader(self, peer, h) -> None:
        """Debug.Stats shows every peer's counters and match rules (object paths that carry session
        ids) and bus-wide activity counters (a live trace of other users' traffic). On a bus with a
        policy only root, the bus's own uid and a caller the policy explicitly allows (the last matching
        rule that names this interface is an allow) may read them, whatever catch-all allow the policy
        has: dbus-daemon's system.conf denies the interface to all but root, dbus-broker does not
        implement the per-peer methods. A bus without a policy (plain `sealbus run`) answers anyone."""
        if self.privileged(peer):
            return
        policy = self.bus.policy
        explicit = policy.explicitly_allows(peer, h.path, I_STATS, h.member) if policy is not None else None
        if explicit is None or explicit:
            return
        log.warning("denied %s.%s to %s: neither root, the bus's uid nor explicitly allowed by the policy",
                    I_STATS, h.member, peer.describe(), extra=about_peer(DENIED, peer, member=h.member))  # fmt: skip
        raise BusError("AccessDenied", f"{I_STATS}.{h.member} is only for root, the bus's own uid "
                       f"({self.bus_owner_uid()}) and callers the bus policy explicitly allows "
                       f'(<allow send_destination="{DBUS_NAME}" send_interface="{I_STATS}"/>); '
                       f"uid {peer.creds.uid} is none of them")  # fmt: skip

    def m_GetStats(self, peer, h):
        self._check_stats_reader(peer, h)
        bus = self.bus
        out = {
            "Serial": Variant("u", bus.serial),
            "ActiveConnections": Variant("u", len(bus.peers)),
            "IncompleteConnections": Variant("u", len(bus.all_peers) - len(bus.peers) - len(bus.monitors)),
            "BusNames": Variant("u", len(bus.registry.queues)),
            "MatchRules": Variant("u", sum(len(p.matches) for p in bus.all_peers)),
            "PendingReplies": Variant("u", len(bus.pending)),
        }
        for k, v in {"messages": bus.messages, **bus.stats}.items():
            out[f"sealbus.{k}"] = Variant("t", v)
        if bus.payload is not None:
            for k, v in bus.payload.stats_dict().items():
                out[f"sealbus.payload.{k}"] = Variant("t", int(v))
        return (out,)

    def m_GetConnectionStats(self, peer, h, name):
        self._check_stats_reader(peer, h)
        p = self._peer_for(name)
        out = {
            "UniqueName": Variant("s", p.unique_name),
            "MatchRules": Variant("u", len(p.matches)),
            "OutgoingMessages": Variant("u", len(p.outbox)),
            "OutgoingBytes": Variant("u", p.out_bytes),
            "OwnedNames": Variant("u", len(p.names)),
            "PendingReplies": Variant("u", p.replies_pending),
        }
        for k, v in p.stats.items():
            out[k] = Variant("t", v)
        return (out,)

    def m_GetAllMatchRules(self, peer, h):
        self._check_stats_reader(peer, h)
        return ({p.unique_name: [r.text for r in p.matches] for p in self.bus.peers.values()},)

    def m_Claim(self, peer, h, cookie):
        payload = self.bus.payload
        if payload is None or getattr(payload, "store", None) is None:
            raise BusError("org.sealbus.Error.PayloadFsUnavailable",
                           "this bus does not serve a payload filesystem (start it with --payload-fs)")  # fmt: skip
        payload.start_claim(self.bus, peer, h.serial, cookie)
        return NotImplemented


__all__ = ["INTROSPECTION", "Driver", "nm", "wm"]
