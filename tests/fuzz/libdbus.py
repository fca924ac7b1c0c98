"""libdbus as the reference: ``dbus_message_demarshal`` judges a whole message the way every
libdbus receiver does. Shared by the hypothesis oracle test and the atheris differential targets.

Known, deliberate differences (sealbus is stricter; each is excluded by its exact error, and this
list stays explicit and minimal):

- an ``h`` value must be below the message's UNIX_FDS count: libdbus checks that only when the
  receiver reads the value, not when it validates the message;
- a message type other than 1-4: libdbus loads it (receivers must ignore it), the bus refuses it;
- a unique name in a header field with no ``.`` (``:1-4``) or an empty first element (``:.18``):
  libdbus checks a unique name's characters only, the spec and sealbus require two or more
  elements, none empty.
"""

import ctypes
import re

from broker.wire.errors import FdIndexError, HeaderError, WireError
from broker.wire.framer import Framer
from broker.wire.message import message_size

_UNIQUE_FIELD = re.compile(r"header field \d+ has an invalid value ':(.*)'", re.S)


class _DBusError(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("message", ctypes.c_char_p), ("dummy", ctypes.c_uint),
                ("padding1", ctypes.c_void_p)]  # fmt: skip


def _load():
    try:
        lib = ctypes.CDLL("libdbus-1.so.3")
    except OSError:
        return None
    lib.dbus_message_demarshal.restype = ctypes.c_void_p
    lib.dbus_message_demarshal.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(_DBusError)]
    lib.dbus_message_unref.argtypes = [ctypes.c_void_p]
    lib.dbus_error_init.argtypes = [ctypes.POINTER(_DBusError)]
    lib.dbus_error_free.argtypes = [ctypes.POINTER(_DBusError)]
    return lib


LIB = _load()


def libdbus_accepts(raw: bytes) -> tuple[bool, str]:
    err = _DBusError()
    LIB.dbus_error_init(ctypes.byref(err))
    m = LIB.dbus_message_demarshal(raw, len(raw), ctypes.byref(err))
    if m:
        LIB.dbus_message_unref(m)
        return True, ""
    reason = (err.message or b"").decode(errors="replace")
    LIB.dbus_error_free(ctypes.byref(err))
    return False, reason


def sealbus_accepts(raw: bytes) -> tuple[bool, WireError | None]:
    f = Framer()
    try:
        msgs = list(f.feed(raw))
    except WireError as e:
        return False, e
    return len(msgs) == 1 and not f.buffered, None


def known_stricter(e: WireError | None) -> bool:
    """A rejection libdbus does not make on purpose (see the module docstring)."""
    if isinstance(e, FdIndexError):
        return True
    if isinstance(e, HeaderError):
        s = str(e)
        if s.startswith("invalid message type"):
            return True
        m = _UNIQUE_FIELD.fullmatch(s)
        return m is not None and ("." not in m[1] or m[1].startswith("."))
    return False


def announced(raw: bytes) -> bytes:
    """``raw`` cut to the message its fixed header announces (libdbus judges that one, ignoring what
    follows; the framer would wait for the rest or start a next message)."""
    try:
        total = message_size(raw, 1 << 27)
    except WireError:
        return raw
    return raw[:total]


def disagreement(raw: bytes) -> str | None:
    """None when sealbus and libdbus judge ``raw`` alike (or sealbus is stricter on purpose), else why not."""
    ours, err = sealbus_accepts(raw)
    ref, reason = libdbus_accepts(raw)
    if ours == ref or (ref and not ours and known_stricter(err)):
        return None
    return (
        f"sealbus {'accepts' if ours else f'rejects ({err})'}, libdbus "
        + ("accepts" if ref else f"rejects ({reason})")
        + f": {raw.hex()}"
    )
