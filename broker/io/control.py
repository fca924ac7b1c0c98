"""The launcher <-> broker control channel: length-prefixed JSON over a socketpair.

The launcher sends the broker its settings (compiled policy included) before
the broker touches any client data, and later reloads; the broker answers
"ready" once it accepts connections.
"""

import json
import struct

import trio

MAX_MESSAGE = 64 * 1024 * 1024
_LEN = struct.Struct("!I")


def encode(obj: dict) -> bytes:
    data = json.dumps(obj).encode()
    return _LEN.pack(len(data)) + data


def _recv_exact(sock, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError("control channel closed")
        out += chunk
    return bytes(out)


def send_msg(sock, obj: dict) -> None:
    sock.sendall(encode(obj))


def recv_msg(sock) -> dict:
    (n,) = _LEN.unpack(_recv_exact(sock, 4))
    if n > MAX_MESSAGE:
        raise ValueError("control message too large")
    return json.loads(_recv_exact(sock, n))


def _decode(data: bytes) -> dict | None:
    """A message, or None if it is not a JSON object (the launcher reads a sandboxed, client-facing
    process: whatever it sends must not crash the launcher)."""
    try:
        msg = json.loads(data)
    except (ValueError, RecursionError):  # bad JSON or UTF-8; nesting deeper than the parser goes
        return None
    return msg if type(msg) is dict else None


class Inbox:
    """Incremental reader for a non-blocking control socket: whole messages out, partial ones kept.
    A message that is not a JSON object is dropped and counted in ``dropped``."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        self.dropped = 0

    def read(self) -> list[dict]:
        """Messages that are complete now; raises EOFError when the peer closed the channel."""
        try:
            chunk = self.sock.recv(65536)
        except BlockingIOError:
            return []
        if not chunk:
            raise EOFError("control channel closed")
        self.buf += chunk
        out = []
        while len(self.buf) >= 4:
            (n,) = _LEN.unpack_from(self.buf)
            if n > MAX_MESSAGE:
                raise EOFError("control message too large")
            if len(self.buf) < 4 + n:
                break
            msg = _decode(bytes(self.buf[4 : 4 + n]))
            del self.buf[: 4 + n]
            if msg is None:
                self.dropped += 1
            else:
                out.append(msg)
        return out


async def control_loop(sock, on_message) -> None:
    """Read messages from the launcher until it closes the channel (then stop the bus)."""
    sock.setblocking(False)
    inbox = Inbox(sock)
    while True:
        await trio.lowlevel.wait_readable(sock)
        try:
            msgs = inbox.read()
        except EOFError as e:
            raise SystemExit(f"launcher went away: {e}") from None
        for msg in msgs:
            on_message(msg)
