"""Target ``sasl``: the SASL server, then the framer on what follows BEGIN (as the broker does).

Input: one byte that picks the read size, then what a client sends on a fresh connection.
Invariants:
- only WireError (SaslError) escapes;
- the replies, the outcome and the bytes left after BEGIN do not depend on how the input is cut
  into reads;
- every reply is a CRLF-terminated ASCII line of a command the spec lets a server send;
- authentication completes only after the server said OK, and only for the peer's own uid: an
  EXTERNAL response that names another uid never gets an OK.
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


def authenticate(data: bytes, step: int) -> tuple[bytes, bool, bytes, type | None]:
    s = SaslServer(UID, GUID)
    replies = bytearray()
    try:
        for pos in range(0, len(data), step):
            replies += s.feed(data[pos : pos + step])
            if s.done:
                return bytes(replies), True, s.leftover + data[pos + step :], None
    except WireError as e:
        return bytes(replies), False, b"", type(e)
    return bytes(replies), False, b"", None


def check_ok_lines(data: bytes) -> None:
    """Fed line by line: every line answered with OK is an EXTERNAL response naming the peer's uid
    (or an empty DATA, which means "the uid the kernel reports")."""
    s = SaslServer(UID, GUID)
    lines = data.split(b"\r\n")
    try:
        for i, line in enumerate(lines):
            last = i == len(lines) - 1
            reply = s.feed(line if last else line + b"\r\n")
            if reply.startswith(b"OK "):
                m = RESPONSE.fullmatch(line.lstrip(b"\0") + b"\r\n")
                assert m, f"OK after {line!r}"
                claimed = binascii.unhexlify(m.group(1)) if m.group(1) else str(UID).encode()
                assert claimed.isdigit() and int(claimed) == UID, f"authenticated as {claimed!r}"
            if s.done:
                return
    except WireError:
        return


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    step = 1 + data[0] % 32 if data[0] & 0x80 else max(1, len(data) - 1)
    data = data[1:]
    whole = authenticate(data, max(1, len(data)))
    cut = authenticate(data, step)
    # replies of the read that fails are never sent: after an error, one stream is a prefix of the other
    same = whole == cut or (whole[1:] == cut[1:] and whole[3] and cut[0].startswith(whole[0]))
    assert same, f"read size {step} changes the outcome: {whole} vs {cut}"
    replies, done, leftover, _err = cut
    pos = 0
    while pos < len(replies):
        m = REPLY.match(replies, pos)
        assert m, f"malformed reply at {pos}: {replies[pos : pos + 40]!r}"
        pos = m.end()
    if done:
        assert b"OK " + GUID.encode() in replies
        assert not leftover or data.endswith(leftover), "leftover is not the input's tail"
        check_ok_lines(data)
        frame(leftover, max(1, len(leftover)))
