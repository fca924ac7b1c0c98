"""Target ``message_oracle``: whole messages (fixed header, header fields, body) judged by sealbus's
framer + header view + body validator and by libdbus's ``dbus_message_demarshal``.

Invariant: both accept or both reject, except the listed, deliberate strictness (tests/fuzz/libdbus.py).
The input is cut to the size its fixed header announces, as a receiver reads it.
"""

from .libdbus import LIB, announced, disagreement


def TestOneInput(data: bytes) -> None:
    if LIB is None:
        raise RuntimeError("libdbus-1.so.3 is not installed: no oracle")
    why = disagreement(announced(data))
    assert why is None, why
