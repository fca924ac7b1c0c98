"""dbus-daemon XML configuration: a strict, fail-closed parser.

Every element and attribute dbus-daemon knows is recognised; anything else is
an error that names the file and line (unlike a broker that silently ignores
what it does not understand and so allows more than was written).
"""

import logging
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from ..bus.limits import HELD_OTHERWISE, NOTHING_TO_BOUND, Limits
from ..bus.settings import ServiceDir
from ..wire.message import DEFAULT_MAX_MESSAGE_SIZE
from .servicedirs import add_unique, standard_session_servicedirs, standard_system_servicedirs


class ConfigError(ValueError):
    """A configuration problem, with file:line in the message."""


SEND_ATTRS = {
    "send_interface", "send_member", "send_error", "send_destination", "send_destination_prefix",
    "send_path", "send_type", "send_broadcast", "send_requested_reply",
}  # fmt: skip
RECEIVE_ATTRS = {
    "receive_interface", "receive_member", "receive_error", "receive_sender", "receive_path",
    "receive_type", "receive_requested_reply",
}  # fmt: skip
OTHER_RULE_ATTRS = {"own", "own_prefix", "user", "group", "eavesdrop", "min_fds", "max_fds", "log"}
RULE_ATTRS = SEND_ATTRS | RECEIVE_ATTRS | OTHER_RULE_ATTRS
MESSAGE_TYPES = {"*", "method_call", "method_return", "signal", "error"}
BOOL_ATTRS = {"send_broadcast", "send_requested_reply", "receive_requested_reply", "eavesdrop", "log"}


def _log_unbounding_limit(file: str, line: int, name: str, value: int) -> None:
    """Say so when a config sets a limit that sealbus accepts but that bounds nothing here (NOTHING_TO_BOUND,
    a warning), that its design meets otherwise (HELD_OTHERWISE, info), or a message size over the protocol's
    maximum, which every path caps (bus.limits.limits_for, as libdbus; info: Debian's session.conf asks
    for 1000000000)."""
    log = logging.getLogger("sealbus.config")
    if name in NOTHING_TO_BOUND:
        log.warning("%s:%d: <limit name=%r> accepted, but it has nothing to bound: %s", file, line, name,
                    NOTHING_TO_BOUND[name])  # fmt: skip
    elif name in HELD_OTHERWISE:
        log.info("%s:%d: <limit name=%r> accepted; sealbus bounds this otherwise: %s", file, line, name,
                 HELD_OTHERWISE[name])  # fmt: skip
    elif name == "max_message_size" and value > DEFAULT_MAX_MESSAGE_SIZE:
        log.info("%s:%d: <limit name=%r> %d is over the protocol's maximum: messages are capped at %d bytes",
                 file, line, name, value, DEFAULT_MAX_MESSAGE_SIZE)  # fmt: skip


@dataclass
class Rule:
    allow: bool
    attrs: dict[str, str]
    file: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def kind(self) -> str:
        keys = set(self.attrs)
        if keys & SEND_ATTRS:
            return "send"
        if keys & RECEIVE_ATTRS:
            return "receive"
        if keys & {"own", "own_prefix"}:
            return "own"
        if "user" in keys:
            return "user"
        if "group" in keys:
            return "group"
        return "eavesdrop" if "eavesdrop" in keys else "empty"


@dataclass
class PolicySection:
    context: str | None  # "default" | "mandatory" | None
    user: str | None = None
    group: str | None = None
    at_console: bool | None = None
    rules: list[Rule] = field(default_factory=list)
    file: str = ""
    line: int = 0


MAX_BUSY_POLL_US = 1000  # a longer poll is a CPU cost with no latency to win


def busy_poll_problem(value: str) -> str | None:
    """Why ``value`` is not a busy-poll maximum in microseconds (config and command line), or None."""
    try:
        n = int(value)
    except ValueError:
        return f"not a number of microseconds: {value!r}"
    return None if 0 <= n <= MAX_BUSY_POLL_US else f"must be 0..{MAX_BUSY_POLL_US} microseconds, not {n}"


@dataclass
class SealbusOptions:
    fd_mode: str | None = None
    payload_fs: str | None = None
    payload_timeout_ms: int | None = None
    payload_max_bytes_per_user: int | None = None
    landlock: str = "best-effort"
    seccomp: str = "best-effort"
    busy_poll_us: int | None = None


@dataclass
class BusConfig:
    type: str | None = None
    user: str | None = None
    pidfile: str | None = None
    fork: bool = False
    keep_umask: bool = False
    syslog: bool = False
    allow_anonymous: bool = False
    listen: list[str] = field(default_factory=list)
    auth: list[str] = field(default_factory=list)
    servicedirs: list[ServiceDir] = field(default_factory=list)  # in config order, standard ones expanded
    servicehelper: str | None = None
    limits: dict[str, int] = field(default_factory=dict)
    policies: list[PolicySection] = field(default_factory=list)
    selinux_associations: dict[str, str] = field(default_factory=dict)
    apparmor_mode: str | None = None
    sealbus: SealbusOptions = field(default_factory=SealbusOptions)
    files: list[str] = field(default_factory=list)
    includedirs: list[str] = field(default_factory=list)  # watched for new files, like the files' own directories
    policy: object = None


def _line(el) -> int:
    return getattr(el, "sourceline", 0) or 0


class _Parser:
    def __init__(self, selinux_enabled: bool):
        self.cfg = BusConfig()
        self.selinux_enabled = selinux_enabled
        self.stack: list[str] = []

    def err(self, file: str, line: int, msg: str) -> ConfigError:
        return ConfigError(f"{file}:{line}: {msg}")

    def parse_file(self, path: str) -> None:
        path = os.path.abspath(path)
        if path in self.stack:
            raise ConfigError(f"{path}: circular <include>")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
        self.stack.append(path)
        self.cfg.files.append(path)
        try:
            self.parse_bytes(data, path)
        finally:
            self.stack.pop()

    def parse_bytes(self, data: bytes, file: str) -> None:
        root = _parse_xml(data, file)
        if root.tag != "busconfig":
            raise self.err(file, _line(root), f"root element must be <busconfig>, not <{root.tag}>")
        self._no_attrs(root, file)
        for el in root:
            self._toplevel(el, file)

    def _no_attrs(self, el, file, allowed=()) -> None:
        for a in el.attrib:
            if a not in allowed:
                raise self.err(file, _line(el), f"<{el.tag}> has unknown attribute {a!r}")

    def _text(self, el, file) -> str:
        if len(el):
            raise self.err(file, _line(el), f"<{el.tag}> must not contain elements")
        t = (el.text or "").strip()
        return t

    def _empty(self, el, file) -> None:
        if len(el) or (el.text or "").strip():
            raise self.err(file, _line(el), f"<{el.tag}> must be empty")

    def _toplevel(self, el, file: str) -> None:  # noqa: C901
        cfg = self.cfg
        tag = el.tag
        line = _line(el)
        if tag == "type":
            self._no_attrs(el, file)
            cfg.type = self._text(el, file)
        elif tag == "user":
            self._no_attrs(el, file)
            cfg.user = self._text(el, file)
        elif tag == "listen":
            self._no_attrs(el, file)
            cfg.listen.append(self._text(el, file))
        elif tag == "auth":
            self._no_attrs(el, file)
            mech = self._text(el, file)
            if mech not in ("EXTERNAL", "DBUS_COOKIE_SHA1", "ANONYMOUS"):
                raise self.err(file, line, f"unknown auth mechanism {mech!r}")
            cfg.auth.append(mech)
        elif tag == "pidfile":
            self._no_attrs(el, file)
            cfg.pidfile = self._text(el, file)
        elif tag in ("fork", "keep_umask", "syslog", "allow_anonymous"):
            self._no_attrs(el, file)
            self._empty(el, file)
            setattr(cfg, tag, True)
        elif tag == "servicedir":
            self._no_attrs(el, file)
            add_unique(cfg.servicedirs, [ServiceDir(self._resolve(file, self._text(el, file)))])
        elif tag in ("standard_session_servicedirs", "standard_system_servicedirs"):
            self._no_attrs(el, file)
            self._empty(el, file)
            std = standard_session_servicedirs(create=True) if tag == "standard_session_servicedirs" else None
            add_unique(cfg.servicedirs, std if std is not None else standard_system_servicedirs())
        elif tag == "servicehelper":
            self._no_attrs(el, file)
            cfg.servicehelper = self._text(el, file)
        elif tag == "include":
            self._include(el, file)
        elif tag == "includedir":
            self._no_attrs(el, file)
            d = self._resolve(file, self._text(el, file))
            self.cfg.includedirs.append(d)
            for p in self._conf_files(d, file, line):
                self.parse_file(p)
        elif tag == "limit":
            self._no_attrs(el, file, ("name",))
            name = el.get("name")
            if name not in Limits.names():
                raise self.err(file, line, f"unknown limit {name!r}")
            try:
                cfg.limits[name] = int(self._text(el, file))
            except ValueError:
                raise self.err(file, line, f"limit {name!r} needs an integer") from None
            _log_unbounding_limit(file, line, name, cfg.limits[name])
        elif tag == "policy":
            self._policy(el, file)
        elif tag == "selinux":
            self._no_attrs(el, file)
            for a in el:
                if a.tag != "associate":
                    raise self.err(file, _line(a), f"unknown element <{a.tag}> in <selinux>")
                self._no_attrs(a, file, ("own", "context"))
                if not a.get("own") or not a.get("context"):
                    raise self.err(file, _line(a), "<associate> needs own= and context=")
                cfg.selinux_associations[a.get("own")] = a.get("context")
        elif tag == "apparmor":
            self._no_attrs(el, file, ("mode",))
            mode = el.get("mode", "enabled")
            if mode not in ("enabled", "disabled", "required"):
                raise self.err(file, line, f"unknown apparmor mode {mode!r}")
            cfg.apparmor_mode = mode
        elif tag == "sealbus":
            self._sealbus(el, file)
        elif tag == "associate":
            raise self.err(file, line, "<associate> must be inside <selinux>")
        else:
            raise self.err(file, line, f"unknown element <{tag}>")

    def _conf_files(self, d: str, file: str, line: int) -> list[str]:
        """The *.conf files of an <includedir>, sorted. Only a missing directory counts as empty
        (as dbus-daemon): one we may not read (EACCES, an SELinux denial) is an error, else an
        administrator's <deny> files there would vanish without a word, failing open."""
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise self.err(file, line, f"<includedir> {d}: cannot list: {e.strerror}") from None
        return [os.path.join(d, n) for n in sorted(names) if n.endswith(".conf")]

    def _resolve(self, file: str, p: str) -> str:
        return p if os.path.isabs(p) else os.path.join(os.path.dirname(file), p)

    def _include(self, el, file: str) -> None:
        self._no_attrs(el, file, ("ignore_missing", "if_selinux_enabled", "selinux_root_relative"))
        flags = {}
        for a in ("ignore_missing", "if_selinux_enabled", "selinux_root_relative"):
            v = el.get(a, "no")
            if v not in ("yes", "no"):
                raise self.err(file, _line(el), f"{a} must be yes or no")
            flags[a] = v == "yes"
        if flags["if_selinux_enabled"] and not self.selinux_enabled:
            return
        p = self._text(el, file)
        if flags["selinux_root_relative"]:
            root = _selinux_policy_root()
            if root is None:
                return
            p = os.path.join(root, p)
        p = self._resolve(file, p)
        if not os.path.exists(p):
            if flags["ignore_missing"]:
                return
            raise self.err(file, _line(el), f"included file {p} does not exist")
        if flags["selinux_root_relative"]:
            return  # dbus_contexts: <busconfig><selinux> associations only; parsed like any file
        self.parse_file(p)

    def _policy(self, el, file: str) -> None:
        self._no_attrs(el, file, ("context", "user", "group", "at_console"))
        given = [a for a in ("context", "user", "group", "at_console") if a in el.attrib]
        if len(given) != 1:
            raise self.err(file, _line(el), "<policy> needs exactly one of context, user, group, at_console")
        sec = PolicySection(context=None, file=file, line=_line(el))
        if "context" in el.attrib:
            if el.get("context") not in ("default", "mandatory"):
                raise self.err(file, _line(el), "policy context must be default or mandatory")
            sec.context = el.get("context")
        elif "user" in el.attrib:
            sec.user = el.get("user")
        elif "group" in el.attrib:
            sec.group = el.get("group")
        else:
            if el.get("at_console") not in ("true", "false"):
                raise self.err(file, _line(el), "at_console must be true or false")
            sec.at_console = el.get("at_console") == "true"
        for r in el:
            if r.tag not in ("allow", "deny"):
                raise self.err(file, _line(r), f"unknown element <{r.tag}> in <policy>")
            sec.rules.append(self._rule(r, file, sec))
        self.cfg.policies.append(sec)

    def _rule(self, r, file: str, sec: PolicySection) -> Rule:  # noqa: C901
        line = _line(r)
        for a in r.attrib:
            if a not in RULE_ATTRS:
                raise self.err(file, line, f"<{r.tag}> has unknown attribute {a!r}")
        if len(r) or (r.text or "").strip():
            raise self.err(file, line, f"<{r.tag}> must be empty")
        keys = set(r.attrib)
        if not keys:
            raise self.err(file, line, f"<{r.tag}> needs at least one attribute")
        if keys & SEND_ATTRS and keys & RECEIVE_ATTRS:
            raise self.err(file, line, "a rule cannot mix send_ and receive_ attributes")
        kinds = [bool(keys & SEND_ATTRS), bool(keys & RECEIVE_ATTRS), bool(keys & {"own", "own_prefix"}),
                 "user" in keys, "group" in keys]  # fmt: skip
        if sum(kinds) > 1:
            raise self.err(file, line, "a rule can be about one of send, receive, own, user or group")
        for a, v in r.attrib.items():
            if a in BOOL_ATTRS and v not in ("true", "false"):
                raise self.err(file, line, f"{a} must be true or false, not {v!r}")
            if a in ("send_type", "receive_type") and v not in MESSAGE_TYPES:
                raise self.err(file, line, f"{a}: unknown message type {v!r}")
            if a in ("min_fds", "max_fds"):
                try:
                    if int(v) < 0:
                        raise ValueError
                except ValueError:
                    raise self.err(file, line, f"{a} must be a non-negative integer") from None
        if "own" in keys and "own_prefix" in keys:
            raise self.err(file, line, "own and own_prefix cannot be combined")
        for d in ("send", "receive"):  # as dbus-daemon: a member alone would also match interface-less messages
            if f"{d}_member" in keys and not keys & {f"{d}_interface", f"{d}_path"}:
                raise self.err(file, line, f"{d}_member needs {d}_interface or {d}_path (not every message "
                                           "has an interface)")  # fmt: skip
        return Rule(r.tag == "allow", dict(r.attrib), file, line)

    def _sealbus(self, el, file: str) -> None:  # noqa: C901
        self._no_attrs(el, file)
        opts = self.cfg.sealbus
        for c in el:
            line = _line(c)
            if c.tag == "fds":
                self._no_attrs(c, file, ("mode",))
                if c.get("mode") not in ("any", "sealed", "none"):
                    raise self.err(file, line, "<fds mode=...> must be any, sealed or none")
                opts.fd_mode = c.get("mode")
            elif c.tag == "payload_fs":
                self._no_attrs(c, file, ("mount", "timeout_ms", "max_bytes_per_user"))
                opts.payload_fs = c.get("mount") or None
                try:
                    if "timeout_ms" in c.attrib:
                        opts.payload_timeout_ms = int(c.get("timeout_ms"))
                    if "max_bytes_per_user" in c.attrib:
                        opts.payload_max_bytes_per_user = int(c.get("max_bytes_per_user"))
                except ValueError:
                    raise self.err(file, line, "payload_fs numbers must be integers") from None
            elif c.tag == "sandbox":
                self._no_attrs(c, file, ("landlock", "seccomp"))
                for a in ("landlock", "seccomp"):
                    v = c.get(a, "best-effort")
                    if v not in ("required", "best-effort"):
                        raise self.err(file, line, f"sandbox {a} must be required or best-effort")
                    setattr(opts, a, v)
            elif c.tag == "busy_poll":
                self._no_attrs(c, file, ("max_us",))
                why = busy_poll_problem(c.get("max_us", ""))
                if why:
                    raise self.err(file, line, f"<busy_poll max_us=...>: {why}")
                opts.busy_poll_us = int(c.get("max_us"))
            else:
                raise self.err(file, line, f"unknown element <{c.tag}> in <sealbus>")


class _Element(ET.Element):
    """An element that remembers its line, for error messages and rule origins."""

    sourceline = 0


def _parse_xml(data: bytes, file: str):
    """Parse with line numbers; a DOCTYPE is fine, entity declarations are refused."""
    from xml.parsers import expat

    parser = expat.ParserCreate()
    stack: list = []
    root = []

    def start(tag, attrs):
        el = _Element(tag, attrs)
        el.sourceline = parser.CurrentLineNumber
        if stack:
            stack[-1].append(el)
        else:
            root.append(el)
        stack.append(el)

    def end(tag):
        stack.pop()

    def text(data):
        if stack:
            el = stack[-1]
            if len(el):
                el[-1].tail = (el[-1].tail or "") + data
            else:
                el.text = (el.text or "") + data

    def entity(*args):
        raise ConfigError(f"{file}:{parser.CurrentLineNumber}: entity declarations are not allowed")

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    parser.EntityDeclHandler = entity
    try:
        parser.Parse(data, True)
    except expat.ExpatError as e:
        raise ConfigError(f"{file}:{e.lineno}: XML error: {expat.ErrorString(e.code)}") from None
    except ConfigError:
        raise
    except (LookupError, ValueError) as e:  # an unknown or broken encoding in the XML declaration
        raise ConfigError(f"{file}:{parser.CurrentLineNumber}: XML error: {e}") from None
    return root[0]


def _selinux_policy_root() -> str | None:
    try:
        import selinux

        if selinux.is_selinux_enabled() != 1:
            return None
        return selinux.selinux_policy_root()
    except Exception:
        return None


def _selinux_enabled() -> bool:
    from .selinux import selinux_enabled

    try:
        return selinux_enabled()
    except Exception:
        return False


def load_config(path: str, *, resolve_names: bool = True) -> BusConfig:
    p = _Parser(_selinux_enabled())
    p.parse_file(path)
    cfg = p.cfg
    from .policy import compile_policy

    cfg.policy = compile_policy(cfg.policies, resolve_names=resolve_names)
    return cfg


def parse_config_string(xml: str, *, filename: str = "<string>", resolve_names: bool = True) -> BusConfig:
    p = _Parser(_selinux_enabled())
    p.parse_bytes(xml.encode(), filename)
    cfg = p.cfg
    from .policy import compile_policy

    cfg.policy = compile_policy(cfg.policies, resolve_names=resolve_names)
    return cfg
