"""SELinux mediation of the bus: ``dbus { acquire_svc send_msg }``, as dbus-daemon asks them.

Only constructed when ``is_selinux_enabled()`` says so: with SELinux off there is
no mediator at all, so no library default can quietly answer "yes". The questions:

* RequestName: the connection's label (SO_PEERSEC at connect) may ``acquire_svc``
  on the context ``<associate own=NAME context=...>`` gives the name, or on the
  bus's own label when the name has no association;
* every delivery, each broadcast recipient separately: the sender's label may
  ``send_msg`` to the receiver's label, or to the bus's label when the message
  is addressed to the driver. What the driver itself sends is not checked.

The answer comes from a decision function (``KernelAVC`` wraps libselinux's
userspace AVC: cached, reload- and setenforce-aware, per-domain permissive).
Denials become AccessDenied errors naming both contexts, a log line, and a
USER_AVC audit record handed to ``audit_sink`` (the launcher writes it: the
broker has no CAP_AUDIT_WRITE).
"""

import logging
import re
import time
from dataclasses import dataclass

from ..bus.log_fields import DENIED, about_peer

log = logging.getLogger("sealbus.selinux")

# The only records the launcher writes for the broker (a compromised broker cannot forge others).
USER_AVC_FORM = re.compile(r"avc:  denied  \{ (send_msg|acquire_svc) \} for [ -~]{1,3000} tclass=dbus permissive=[01]")
_TYPES = {1: "method_call", 2: "method_return", 3: "error", 4: "signal"}


@dataclass(frozen=True)
class AVDecision:
    allowed: bool  # the access goes ahead (true in permissive mode even when denied)
    denied: bool  # the policy does not grant it
    audit: bool  # the policy wants the denial audited (no dontaudit)
    permissive: bool


class KernelAVC:
    """The real decision function: libselinux's AVC on the kernel policy."""

    def __init__(self):
        import selinux

        self._se = selinux
        selinux.avc_open(None, 0)  # raises OSError when there is no selinuxfs
        self._class = selinux.string_to_security_class("dbus")
        if not self._class:
            raise OSError("the loaded policy has no dbus class")
        self._perm = {p: selinux.string_to_av_perm(self._class, p) for p in ("send_msg", "acquire_svc")}
        self._sids: dict[str, object] = {}

    def own_label(self) -> str:
        return _second(self._se.getcon_raw())

    def _sid(self, ctx: str):
        sid = self._sids.get(ctx)
        if sid is None:
            if len(self._sids) > 4096:
                self._sids.clear()
            sid = self._sids[ctx] = _second(self._se.avc_context_to_sid_raw(ctx))
        return sid

    def check(self, scon: str, tcon: str, perm: str) -> AVDecision:
        se = self._se
        req = self._perm[perm]
        avd = se.av_decision()
        try:
            se.avc_has_perm_noaudit(self._sid(scon), self._sid(tcon), self._class, req, se.avc_entry_ref(), avd)
            rc_ok = True
        except OSError:
            rc_ok = False  # EACCES in enforcing mode (avd was filled before the refusal)
        denied = bool(req & ~avd.allowed)
        permissive = denied and rc_ok
        return AVDecision(not denied or permissive, denied, bool(req & avd.auditdeny), permissive)


def _second(r):
    """libselinux's SWIG bindings return (rc, value) pairs for out-parameters."""
    return r[1] if isinstance(r, (list, tuple)) else r


class AuditLimiter:
    """At most `rate` records per second (burst `burst`): a denial flood must not become an audit flood."""

    def __init__(self, rate: float = 50.0, burst: int = 200):
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.last = time.monotonic()
        self.suppressed = 0

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.suppressed += 1
        return False


class SELinuxMediator:
    def __init__(self, avc, bus_label: str, associations: dict[str, str] | None = None, audit_sink=None):
        self.avc = avc
        self.bus_label = bus_label
        self.associations = dict(associations or {})
        self.audit_sink = audit_sink  # callable(text) or None: log only
        self.limiter = AuditLimiter()
        self.stats = {"send_msg_denied": 0, "acquire_svc_denied": 0, "audit_suppressed": 0}

    def _label(self, peer) -> str:
        # a peer whose label the kernel did not give us is treated as the unlabeled initial SID would be
        return peer.creds.label or "system_u:object_r:unlabeled_t:s0"

    def check_own(self, peer, name: str) -> str | None:
        scon, tcon = self._label(peer), self.associations.get(name, self.bus_label)
        d = self.avc.check(scon, tcon, "acquire_svc")
        if not d.denied:
            return None
        self.stats["acquire_svc_denied"] += 1
        self._audit(d, "acquire_svc", f"service={name} spid={peer.creds.pid}", scon, tcon, peer)
        if d.allowed:
            return None
        return (f'Connection "{peer.unique_name}" is not allowed to own the service "{name}" due to '
                f"SELinux policy (scontext={scon} tcontext={tcon} tclass=dbus perm=acquire_svc)")  # fmt: skip

    def check_send(self, sender, target, h) -> str | None:
        scon = self._label(sender)
        tcon = self._label(target) if target is not None else self.bus_label
        d = self.avc.check(scon, tcon, "send_msg")
        if not d.denied:
            return None
        self.stats["send_msg_denied"] += 1
        tpid = target.creds.pid if target is not None else ""
        what = (f"msgtype={_TYPES.get(h.type, h.type)} interface={h.interface or '(unset)'} "
                f"member={h.member or '(unset)'} dest={h.destination or '(unset)'} "
                f"spid={sender.creds.pid} tpid={tpid}")  # fmt: skip
        self._audit(d, "send_msg", what, scon, tcon, sender)
        if d.allowed:
            return None
        return (f"An SELinux policy prevents this sender from sending this message to this recipient "
                f"({what} scontext={scon} tcontext={tcon} tclass=dbus perm=send_msg)")  # fmt: skip

    def _audit(self, d: AVDecision, perm: str, what: str, scon: str, tcon: str, who) -> None:
        text = (f"avc:  denied  {{ {perm} }} for {what} scontext={scon} tcontext={tcon} "
                f"tclass=dbus permissive={int(d.permissive)}")  # fmt: skip
        fields = about_peer(DENIED, who, selinux_perm=perm, selinux_permissive=int(d.permissive))
        log.warning("SELinux %s %s (peer %s): %s", "would deny" if d.permissive else "denied", perm, who.describe(),
                    text, extra=fields)  # fmt: skip
        if not d.audit or self.audit_sink is None:
            return
        if not self.limiter.take():
            self.stats["audit_suppressed"] = self.limiter.suppressed
            return
        try:
            self.audit_sink(text)
        except OSError as e:
            log.error("cannot hand the USER_AVC record on: %s", e)


def selinux_enabled() -> bool:
    if not kernel_has_selinuxfs():
        return False  # what libselinux would answer, without importing its bindings (start-up time)
    try:
        import selinux
    except ImportError:
        return False
    return selinux.is_selinux_enabled() == 1


def kernel_has_selinuxfs(filesystems: str = "/proc/filesystems") -> bool:
    """False only when the kernel has no selinuxfs at all, where libselinux's is_selinux_enabled() is 0
    as well (it finds no selinuxfs to mount); True when it has one, or when that cannot be read."""
    try:
        with open(filesystems, "rb") as f:
            return b"\tselinuxfs\n" in f.read()
    except OSError:
        return True


def make_mediator(associations: dict[str, str] | None = None, audit_sink=None) -> SELinuxMediator | None:
    """The mediator for this kernel, or None when SELinux is disabled (then nothing is checked)."""
    if not selinux_enabled():
        return None
    avc = KernelAVC()
    return SELinuxMediator(avc, avc.own_label(), associations, audit_sink)
