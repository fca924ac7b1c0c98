"""Validation of object paths, bus names, interface, member and error names."""

import re

from .errors import InvalidNameError

MAX_NAME_LENGTH = 255

_ELEMENT = r"[A-Za-z_][A-Za-z0-9_]*"
_INTERFACE_RE = re.compile(rf"{_ELEMENT}(?:\.{_ELEMENT})+\Z")
_MEMBER_RE = re.compile(rf"{_ELEMENT}\Z")
_WELL_KNOWN_RE = re.compile(r"[A-Za-z_-][A-Za-z0-9_-]*(?:\.[A-Za-z_-][A-Za-z0-9_-]*)+\Z")
_UNIQUE_RE = re.compile(r":[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)+\Z")
_PATH_RE = re.compile(r"/\Z|(?:/[A-Za-z0-9_]+)+\Z")


def is_object_path(s: str) -> bool:
    return isinstance(s, str) and _PATH_RE.match(s) is not None


def is_interface_name(s: str) -> bool:
    return isinstance(s, str) and len(s) <= MAX_NAME_LENGTH and _INTERFACE_RE.match(s) is not None


def is_error_name(s: str) -> bool:
    return is_interface_name(s)


def is_member_name(s: str) -> bool:
    return isinstance(s, str) and len(s) <= MAX_NAME_LENGTH and _MEMBER_RE.match(s) is not None


def is_unique_name(s: str) -> bool:
    return isinstance(s, str) and len(s) <= MAX_NAME_LENGTH and _UNIQUE_RE.match(s) is not None


def is_well_known_name(s: str) -> bool:
    return isinstance(s, str) and len(s) <= MAX_NAME_LENGTH and _WELL_KNOWN_RE.match(s) is not None


def is_bus_name(s: str) -> bool:
    return is_unique_name(s) or is_well_known_name(s)


def _check(ok: bool, kind: str, s: object) -> None:
    if not ok:
        raise InvalidNameError(f"invalid {kind}: {s!r}")


def check_object_path(s: str) -> None:
    _check(is_object_path(s), "object path", s)


def check_interface_name(s: str) -> None:
    _check(is_interface_name(s), "interface name", s)


def check_error_name(s: str) -> None:
    _check(is_error_name(s), "error name", s)


def check_member_name(s: str) -> None:
    _check(is_member_name(s), "member name", s)


def check_bus_name(s: str) -> None:
    _check(is_bus_name(s), "bus name", s)
