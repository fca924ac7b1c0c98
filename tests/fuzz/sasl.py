"""Target ``sasl``: the SASL server, then the framer on what follows BEGIN (as the broker does).

Input: one byte that picks the read size, then what a client sends on a fresh connection.
Invariants:
- only WireError (SaslError) escapes;
- the replies, the outcome and the bytes left after BEGIN do not depend on how the input is cut
  into reads: fed whole, and fed in reads that end where the server's state can change (after the
  NUL, inside every CRLF, after every line end, and a fuzzer-picked number of bytes into every
  line), or in fixed-size reads (1-32 bytes) for the first ``STEP_READS`` reads;
- every reply is a CRLF-terminated ASCII line of a command the spec lets a server send;
- before BEGIN every line gets exactly one reply; authentication completes only after the server
  said OK, and only for the peer's own uid: an EXTERNAL response that names another uid never gets
  an OK.
"""

import binascii
import re

from broker.wire.errors import WireError
from broker.wire.sasl import SaslServer

from .framer import frame

UID = 1000
GUID = "0123456789abcdef0123456789abcdef"
REPLY = re.compile(rb"(OK " + GUID.encode() + rb"|REJECTED EXTERNAL|DATA|AGREE_UNIX_FD|ERROR( \"[ -~]*\")?)\r\n")
RESPONSE = re.compile(rb"(?:AUTH EXTERNAL |DATA ?)([0-9a-fA-F]*)\r\n")


# Fixed-size reads stop after this many (the rest is one read): 1-byte reads of a 16 KiB input cost
# 16,000 calls, 50 times the rest of the check; within a line a read boundary only moves the
# line-length check, which the line cuts reach too (every CRLF split, a cut inside every line).
STEP_READS = 256
MAX_CUTS = 1024
_LINE_END = re.compile(rb"[\r\n]")


def line_cuts(data: bytes, into: int) -> list[int]:
    """Where reads end in the line-aware mode: after the NUL, after every CR and LF (so every CRLF
    is split, and a bare CR ends a read), and ``into`` bytes into every line (the first MAX_CUTS)."""
    cuts = {1, 1 + into}
    for m in _LINE_END.finditer(data, 1):
        cuts.add(m.end())
        if data[m.start()] == 10:
            cuts.add(m.end() + into)
    return sorted(c for c in cuts if c < len(data))[:MAX_CUTS]


def step_cuts(data: bytes, step: int) -> list[int]:
    return list(range(step, min(len(data), step * STEP_READS), step))


def authenticate(data: bytes, cuts: list[int]) -> tuple[bytes, bool, bytes, type | None]:
    """Feed ``data`` in reads ending at ``cuts``: the replies, whether BEGIN completed, the bytes after
    it, and the error that ended the handshake."""
    s = SaslServer(UID, GUID)
    replies = bytearray()
    try:
        for pos, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
            replies += s.feed(data[pos:end])
            if s.done:
                return bytes(replies), True, s.leftover + data[end:], None
    except WireError as e:
        return bytes(replies), False, b"", type(e)
    return bytes(replies), False, b"", None


def check_answers(data: bytes, replies: bytes) -> None:
    """Of a completed handshake: every line before BEGIN got exactly one reply (so the n-th reply
    answers the n-th line), and a line answered with OK is an EXTERNAL response naming the peer's
    uid (or an empty one, which means "the uid the kernel reports")."""
    answers = replies.split(b"\r\n")[:-1]
    lines = data[1:].split(b"\r\n", len(answers) + 1)  # data[0] is the NUL
    assert len(lines) > len(answers), f"{len(answers)} replies to {len(lines)} lines"
    assert lines[len(answers)].partition(b" ")[0] == b"BEGIN", f"{len(answers)} replies before BEGIN"
    for answer, line in zip(answers, lines, strict=False):
        if answer.startswith(b"OK "):
            m = RESPONSE.fullmatch(line + b"\r\n")
            assert m, f"OK after {line!r}"
            claimed = binascii.unhexlify(m.group(1)) if m.group(1) else str(UID).encode()
            assert claimed.isdigit() and int(claimed) == UID, f"authenticated as {claimed!r}"


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    pick = data[0]
    data = data[1:]
    cuts = step_cuts(data, 1 + pick % 32) if pick & 0x80 else line_cuts(data, pick % 32)
    whole = authenticate(data, [])
    cut = authenticate(data, cuts)
    # replies of the read that fails are never sent: after an error, one stream is a prefix of the other
    same = whole == cut or (whole[1:] == cut[1:] and whole[3] and cut[0].startswith(whole[0]))
    assert same, f"reads ending at {cuts[:20]} change the outcome: {whole} vs {cut}"
    replies, done, leftover, _err = cut
    pos = 0
    while pos < len(replies):
        m = REPLY.match(replies, pos)
        assert m, f"malformed reply at {pos}: {replies[pos : pos + 40]!r}"
        pos = m.end()
    if done:
        assert b"OK " + GUID.encode() in replies
        assert not leftover or data.endswith(leftover), "leftover is not the input's tail"
        check_answers(data, replies)
        frame(leftover, [])
