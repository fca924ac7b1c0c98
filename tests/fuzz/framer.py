"""Target ``framer``: the streaming framer, the header view and the forwarded header.

Input: one byte that picks the read size, then the byte stream a client sends after BEGIN.
Invariants:
- only WireError escapes;
- the verdict does not depend on how the stream is cut into reads: fed whole or in reads of
  the picked size, the same messages come out (same bytes), then the same error type or none;
- a message is never longer than the input, and the messages plus what stays buffered are
  exactly the bytes fed;
- a message the framer hands out, forwarded with a SENDER, frames again into one message with
  the same type, flags, serial, routing fields and body (what a receiver gets is what was sent).
"""

from broker.wire.errors import WireError
from broker.wire.framer import Framer

FDS = [-1] * 4  # fake fd numbers: the framer only counts and attaches them
SENDER = ":1.42"


def frame(data: bytes, step: int) -> tuple[list[bytes], type | None, int]:
    """The messages (taken one by one, as the broker does), the error that ended the stream, and what
    stays buffered (-1 after an error)."""
    f = Framer(max_message_size=1 << 20)
    out: list[bytes] = []
    try:
        for pos in range(0, len(data), step):
            f.push(data[pos : pos + step], FDS if not pos else ())
            out.extend(bytes(m.header.raw) for m in f.messages())
    except WireError as e:
        return out, type(e), -1
    return out, None, f.buffered


def _fields(h) -> tuple:
    return (h.type, h.flags, h.serial, h.path, h.interface, h.member, h.error_name, h.reply_serial,
            h.destination, h.signature, h.unix_fds, bytes(h.body))  # fmt: skip


def check_forward(raw: bytes) -> None:
    (m,) = Framer().feed(raw, fds=FDS)
    again = Framer().feed(m.header.forward_header(SENDER) + bytes(m.header.body), fds=FDS)
    assert len(again) == 1, f"forwarded message frames into {len(again)} messages"
    h2 = again[0].header
    assert _fields(h2) == _fields(m.header), f"forwarding changed the message: {m.header!r} -> {h2!r}"
    assert h2.sender == SENDER and h2.unknown_fields == 0


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    step = 1 + data[0] % 64 if data[0] & 0x80 else len(data)
    data = data[1:]
    whole, err, left = frame(data, max(1, len(data)))
    cut, err2, left2 = frame(data, step)
    assert (whole, err, left) == (cut, err2, left2), f"read size {step} changes the outcome: {err} vs {err2}"
    assert sum(map(len, whole)) <= len(data)
    if err is None:
        assert sum(map(len, whole)) + left == len(data), "bytes lost or invented by the framer"
    for raw in whole:
        check_forward(raw)
