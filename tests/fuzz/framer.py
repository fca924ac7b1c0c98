"""Target ``framer``: the streaming framer, the header view and the forwarded header.

Input: one byte that picks how the stream is cut into reads, then the byte stream a client sends
after BEGIN.
Invariants:
- only WireError escapes;
- the verdict does not depend on how the stream is cut into reads: fed whole, and fed in reads that
  end where the framer's state changes (a fuzzer-picked offset into every message, the last byte
  of every fixed header and the one after it, the end of every header field array, the last byte
  of every message and the one after it), or in fixed-size reads (1-64 bytes) for the first
  ``STEP_READS`` reads, the same messages come out (same bytes), then the same error type or none;
- a message is never longer than the input, and the messages plus what stays buffered are
  exactly the bytes fed;
- a message the framer hands out, forwarded with a SENDER, frames again into one message with
  the same type, flags, serial, routing fields and body (what a receiver gets is what was sent).
"""

from broker.wire.errors import WireError
from broker.wire.framer import Framer
from broker.wire.message import FIXED_HEADER_SIZE, message_size

FDS = [-1] * 4  # fake fd numbers: the framer only counts and attaches them
SENDER = ":1.42"
MAX_SIZE = 1 << 20
# Fixed-size reads stop after this many (the rest is one read): 1-byte reads of a 4 KiB stream cost
# 4,000 pushes, and the message-aware cuts reach every boundary where the framer's state changes.
STEP_READS = 256


def message_cuts(data: bytes, into: int) -> list[int]:
    """Read ends around every message's structure, walking the stream by announced sizes."""
    cuts = set()
    pos = 0
    while pos < len(data):
        cuts.update((pos + into, pos + FIXED_HEADER_SIZE - 1, pos + FIXED_HEADER_SIZE))
        try:
            total = message_size(data, MAX_SIZE, pos)
        except WireError:
            break
        fields_len = int.from_bytes(data[pos + 12 : pos + 16], "little" if data[pos] == ord("l") else "big")
        cuts.update((pos + FIXED_HEADER_SIZE + fields_len, pos + total - 1, pos + total))
        pos += total
    return sorted(c for c in cuts if 0 < c < len(data))


def step_cuts(data: bytes, step: int) -> list[int]:
    return list(range(step, min(len(data), step * STEP_READS), step))


def frame(data: bytes, cuts: list[int], keep: list | None = None) -> tuple[list[bytes], type | None, int]:
    """The messages (taken one by one, as the broker does), the error that ended the stream, and what
    stays buffered (-1 after an error). The messages' header views go to ``keep``."""
    f = Framer(max_message_size=MAX_SIZE)
    out: list[bytes] = []
    try:
        for pos, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
            f.push(data[pos:end], FDS if not pos else ())
            for m in f.messages():
                out.append(bytes(m.header.raw))
                if keep is not None:
                    keep.append(m.header)
    except WireError as e:
        return out, type(e), -1
    return out, None, f.buffered


def _fields(h) -> tuple:
    return (h.type, h.flags, h.serial, h.path, h.interface, h.member, h.error_name, h.reply_serial,
            h.destination, h.signature, h.unix_fds, bytes(h.body))  # fmt: skip


def check_forward(h) -> None:
    again = Framer().feed(h.forward_header(SENDER) + bytes(h.body), fds=FDS)
    assert len(again) == 1, f"forwarded message frames into {len(again)} messages"
    h2 = again[0].header
    assert _fields(h2) == _fields(h), f"forwarding changed the message: {h!r} -> {h2!r}"
    assert h2.sender == SENDER and h2.unknown_fields == 0


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    pick = data[0]
    data = data[1:]
    cuts = step_cuts(data, 1 + pick % 64) if pick & 0x80 else message_cuts(data, pick % 64)
    headers: list = []
    whole, err, left = frame(data, [], headers)
    cut, err2, left2 = frame(data, cuts)
    assert (whole, err, left) == (cut, err2, left2), f"reads ending at {cuts[:20]} change the outcome: {err} vs {err2}"
    assert sum(map(len, whole)) <= len(data)
    if err is None:
        assert sum(map(len, whole)) + left == len(data), "bytes lost or invented by the framer"
    for h in headers:
        check_forward(h)
