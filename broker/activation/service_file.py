"""D-Bus service files: the ``[D-BUS Service]`` desktop-entry format dbus-daemon activates from.

The syntax follows dbus-daemon's desktop-file reader, rule for rule, so that a
file it refuses is refused here too and one it accepts means the same thing:

- the whole file is UTF-8 and at most ``MAX_FILE_BYTES`` (128 KiB) long;
- a line is ended by ``\\n``, ``\\r\\n`` or ``\\r``; blank lines (spaces, tabs,
  ``\\f``, ``\\r``) and lines starting with ``#`` are skipped;
- ``[group]`` opens a group: the line ends with ``]``, the name is not empty
  and is printable ASCII without ``[``/``]``;
- ``key=value`` needs a group before it; the key is ``[A-Za-z0-9-]+``; spaces
  (only spaces) may surround ``=``; ``key[locale]=...`` lines are ignored;
- the value is unescaped: ``\\s \\t \\n \\r \\\\``; any other escape, a trailing
  backslash or a NUL is an error;
- a repeated group or key: the first one counts.

What dbus-daemon then asks of the ``[D-BUS Service]`` group: ``Name=`` and
``Exec=`` are required (systemd-activated files say ``Exec=/bin/false``);
``User=``, ``SystemdService=`` and ``AssumedAppArmorLabel=`` are optional;
other keys and groups are ignored. On the system bus, where dbus-daemon's
setuid launch helper refuses to start a service whose file lacks ``User=`` or
is not named ``Name`` + ``.service`` (its Spawn.FileInvalid), such a file is
refused here when it is loaded, so it is never listed as activatable.
``Name=`` must be a valid well-known bus name.
"""

import os
from dataclasses import dataclass

from ..wire.name_syntax import is_well_known_name

SERVICE_GROUP = "D-BUS Service"
SUFFIX = ".service"
MAX_FILE_BYTES = 128 * 1024  # dbus-daemon's bound on one service file
_ESCAPES = {"s": " ", "t": "\t", "n": "\n", "r": "\r", "\\": "\\"}
_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")
_BLANK = frozenset(" \t\r\f")


class ServiceFileError(ValueError):
    """A service file that cannot be used; the message names the file (and line) and the reason."""


@dataclass(frozen=True)
class ServiceFile:
    """One activatable service, as its file describes it."""

    name: str  # the well-known name it provides
    exec: str  # the raw Exec= line (split and run by whoever starts the service, never by the broker)
    user: str | None  # User=: whom to run it as (system bus)
    systemd_service: str | None  # SystemdService=: the unit systemd starts instead
    path: str  # the file it came from
    assumed_apparmor_label: str | None = None  # AssumedAppArmorLabel=, kept for policy checks


def _lines(text: str):
    """(line number, line) pairs, line ends being \\n, \\r\\n or \\r as in dbus-daemon."""
    return enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), 1)


def _unescape(raw: str, where: str) -> str:
    out = []
    i = 0
    while i < len(raw):
        c = raw[i]
        if c == "\0":
            raise ServiceFileError(f"{where}: the value contains a NUL")
        if c != "\\":
            out.append(c)
            i += 1
            continue
        if i + 1 >= len(raw):
            raise ServiceFileError(f"{where}: the value ends in a backslash")
        esc = _ESCAPES.get(raw[i + 1])
        if esc is None:
            raise ServiceFileError(f"{where}: invalid escape sequence \\{raw[i + 1]}")
        out.append(esc)
        i += 2
    return "".join(out)


def _group_name(line: str, where: str) -> str:
    """The name a ``[group]`` line opens."""
    if len(line) <= 2 or not line.endswith("]"):
        raise ServiceFileError(f"{where}: invalid group header")
    group = line[1:-1]
    if any(ord(c) <= 0x1F or ord(c) >= 0x7F or c in "[]" for c in group):
        raise ServiceFileError(f"{where}: invalid characters in group name")
    return group


def _key_value(line: str, where: str) -> tuple[str, str] | None:
    """(key, unescaped value) of a ``key=value`` line; None for a localised ``key[locale]=`` line."""
    key_end = 0
    while key_end < len(line) and line[key_end] in _KEY_CHARS:
        key_end += 1
    if key_end == 0:
        raise ServiceFileError(f"{where}: empty key name")
    rest = line[key_end:]
    if rest.startswith("["):
        return None  # a localised key: ignored, as dbus-daemon does
    rest = rest.lstrip(" ")
    if not rest:
        raise ServiceFileError(f"{where}: no '=' in key/value line")
    if rest[0] != "=":
        raise ServiceFileError(f"{where}: invalid characters in key name")
    return line[:key_end], _unescape(rest[1:].lstrip(" "), where)


def parse_groups(text: str, path: str) -> dict[str, dict[str, str]]:
    """group -> key -> unescaped value, by the desktop-file rules above (first group and key win)."""
    groups: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for num, line in _lines(text):
        where = f"{path}:{num}"
        if line.startswith("["):
            group = _group_name(line, where)
            # a repeated group: its keys are never looked at (the first one counts)
            current = {} if group in groups else groups.setdefault(group, {})
        elif line.startswith("#") or all(c in _BLANK for c in line):
            continue
        elif current is None:
            raise ServiceFileError(f"{where}: key=value before any [group]")
        else:
            kv = _key_value(line, where)
            if kv is not None:
                current.setdefault(*kv)
    return groups


def parse_service_file(text: str, path: str, *, system_bus: bool) -> ServiceFile:
    """The service ``path`` describes (``text`` is its contents), or ServiceFileError saying why not."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise ServiceFileError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    group = parse_groups(text, path).get(SERVICE_GROUP)
    if group is None:
        raise ServiceFileError(f"{path}: no [{SERVICE_GROUP}] group")
    for key in ("Name", "Exec"):
        if key not in group:
            raise ServiceFileError(f"{path}: no {key}= key in [{SERVICE_GROUP}]")
    name = group["Name"]
    if not is_well_known_name(name):
        raise ServiceFileError(f"{path}: Name={name!r} is not a valid well-known bus name")
    if system_bus:
        if "User" not in group:
            raise ServiceFileError(f"{path}: a system bus service file needs User=")
        expected = name + SUFFIX
        if os.path.basename(path) != expected:
            raise ServiceFileError(f"{path}: a system bus service file must be named {expected}")
    return ServiceFile(
        name=name,
        exec=group["Exec"],
        user=group.get("User"),
        systemd_service=group.get("SystemdService"),
        path=path,
        assumed_apparmor_label=group.get("AssumedAppArmorLabel"),
    )


def read_service_file(path: str, *, system_bus: bool) -> ServiceFile:
    """Read and parse one file (bounded read; invalid UTF-8 is an error, as in dbus-daemon)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ServiceFileError(f"{path}: cannot read: {e.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ServiceFileError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ServiceFileError(f"{path}: not valid UTF-8") from None
    return parse_service_file(text, path, system_bus=system_bus)
