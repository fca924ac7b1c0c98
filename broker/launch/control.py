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


async def control_loop(sock, on_message) -> None:
    """Read messages from the launcher until it closes the channel (then stop the bus)."""
    sock.setblocking(False)
    buf = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        if not chunk:
            raise SystemExit("launcher went away")
        buf += chunk
        while len(buf) >= 4:
            (n,) = _LEN.unpack_from(buf)
            if n > MAX_MESSAGE:
                raise SystemExit("control message too large")
            if len(buf) < 4 + n:
                break
            msg = json.loads(bytes(buf[4 : 4 + n]))
            del buf[: 4 + n]
            on_message(msg)
