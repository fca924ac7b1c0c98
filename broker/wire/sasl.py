"""SASL server state machine for the D-Bus authentication handshake.

Sans-IO: ``feed(data)`` takes what the client sent and returns the bytes to
send back. Only EXTERNAL is offered: the uid a client claims must equal the
uid the kernel reported for the socket (SO_PEERCRED), which the caller passes
in. After ``BEGIN`` the remaining bytes belong to the message stream and are
available as ``leftover``.
"""

import binascii
import enum

from .errors import SaslError

MAX_LINE = 16 * 1024
MAX_ATTEMPTS = 8
MAX_TOTAL = 64 * 1024


class State(enum.Enum):
    WAIT_NUL = 0
    WAIT_AUTH = 1
    WAIT_DATA = 2
    WAIT_BEGIN = 3
    DONE = 4


class SaslServer:
    def __init__(self, peer_uid: int, guid: str, unix_fd_supported: bool = True):
        self.peer_uid = peer_uid
        self.guid = guid
        self.unix_fd_supported = unix_fd_supported
        self.state = State.WAIT_NUL
        self.unix_fd = False
        self.leftover = b""
        self._buf = bytearray()
        self._total = 0
        self._rejects = 0

    @property
    def done(self) -> bool:
        return self.state is State.DONE

    def feed(self, data: bytes) -> bytes:
        """Consume client bytes; return the reply bytes. Raises SaslError to disconnect."""
        if self.state is State.DONE:
            raise SaslError("authentication already complete")
        self._total += len(data)
        if self._total > MAX_TOTAL and self.state is not State.WAIT_BEGIN:
            raise SaslError("too many bytes during authentication")
        self._buf += data
        out = bytearray()
        if self.state is State.WAIT_NUL:
            if not self._buf:
                return b""
            if self._buf[0] != 0:
                raise SaslError("the first byte must be NUL")
            del self._buf[0]
            self.state = State.WAIT_AUTH
        while self.state is not State.DONE:
            idx = self._buf.find(b"\r\n")
            if idx < 0:
                # a trailing "\r" may be the first half of the line's end, not part of the line:
                # a line of exactly MAX_LINE must not depend on where the reads cut its CRLF
                if len(self._buf) - self._buf.endswith(b"\r") > MAX_LINE:
                    raise SaslError("authentication line too long")
                break
            if idx > MAX_LINE:
                raise SaslError("authentication line too long")
            line = bytes(self._buf[:idx])
            del self._buf[: idx + 2]
            out += self._line(line)
        if self.state is State.DONE:
            self.leftover = bytes(self._buf)
            self._buf.clear()
        return bytes(out)

    def _reject(self) -> bytes:
        self._rejects += 1
        if self._rejects > MAX_ATTEMPTS:
            raise SaslError("too many failed authentication attempts")
        self.state = State.WAIT_AUTH
        return b"REJECTED EXTERNAL\r\n"

    def _line(self, line: bytes) -> bytes:  # noqa: C901
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            return b'ERROR "non-ASCII command"\r\n'
        cmd, _, arg = text.partition(" ")
        st = self.state
        if cmd == "AUTH" and st is State.WAIT_AUTH:
            mech, _, resp = arg.partition(" ")
            if mech != "EXTERNAL":
                return self._reject()
            if not resp:
                self.state = State.WAIT_DATA
                return b"DATA\r\n"
            return self._external(resp)
        if cmd == "DATA" and st is State.WAIT_DATA:
            return self._external(arg)
        if cmd == "CANCEL" and st in (State.WAIT_DATA, State.WAIT_BEGIN):
            return self._reject()
        if cmd == "ERROR" and st in (State.WAIT_DATA, State.WAIT_BEGIN):
            return self._reject()
        if cmd == "BEGIN" and st is State.WAIT_BEGIN:
            self.state = State.DONE
            return b""
        if cmd == "BEGIN":
            raise SaslError("BEGIN before successful authentication")
        if cmd == "NEGOTIATE_UNIX_FD" and st is State.WAIT_BEGIN:
            if self.unix_fd_supported:
                self.unix_fd = True
                return b"AGREE_UNIX_FD\r\n"
            return b'ERROR "fd passing is not supported on this transport"\r\n'
        if cmd in ("AUTH", "DATA", "CANCEL", "NEGOTIATE_UNIX_FD", "ERROR"):
            if st is State.WAIT_DATA:
                return self._reject()
            return b'ERROR "unexpected command in this state"\r\n'
        if st is State.WAIT_DATA:
            return self._reject()
        return b'ERROR "unknown command"\r\n'

    def _external(self, resp: str) -> bytes:
        if resp:
            try:
                claimed = binascii.unhexlify(resp).decode("ascii")
            except (binascii.Error, ValueError, UnicodeDecodeError):
                return self._reject()
            if not claimed.isdigit() or int(claimed) != self.peer_uid:
                return self._reject()
        self.state = State.WAIT_BEGIN
        return f"OK {self.guid}\r\n".encode()
