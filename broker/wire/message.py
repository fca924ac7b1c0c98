"""Message headers: a view that parses only what routing needs, and re-emission.

The broker never unmarshals the body of a message it forwards. ``HeaderView``
parses the 16-byte fixed header and the header-field array, validates them
strictly, and keeps the body as a ``memoryview`` slice of the received buffer.
``HeaderView.forward(sender)`` re-emits the header with SENDER set and
unknown fields stripped; the body goes out by scatter/gather, uncopied.
"""

import struct
from typing import Any

from . import name_syntax as names
from .errors import HeaderError, InvalidValueError, LimitExceededError, TruncatedError, WireError
from .marshal import Reader, Writer, unmarshal
from .signature import split_signature

METHOD_CALL, METHOD_RETURN, ERROR, SIGNAL = 1, 2, 3, 4
TYPE_NAMES = {1: "method_call", 2: "method_return", 3: "error", 4: "signal"}
NO_REPLY_EXPECTED, NO_AUTO_START, ALLOW_INTERACTIVE_AUTHORIZATION = 0x1, 0x2, 0x4

F_PATH, F_INTERFACE, F_MEMBER, F_ERROR_NAME, F_REPLY_SERIAL = 1, 2, 3, 4, 5
F_DESTINATION, F_SENDER, F_SIGNATURE, F_UNIX_FDS = 6, 7, 8, 9
F_CONTAINER_INSTANCE = 10  # reserved by libdbus for its (experimental) containers; stripped like any unknown field
FIELD_TYPES = {1: "o", 2: "s", 3: "s", 4: "s", 5: "u", 6: "s", 7: "s", 8: "g", 9: "u"}
_FIELD_SIG_BYTES = {c: bytes([1, ord(t), 0]) for c, t in FIELD_TYPES.items()}

DEFAULT_MAX_MESSAGE_SIZE = 128 * 1024 * 1024
FIXED_HEADER_SIZE = 16

LOCAL_PATH = "/org/freedesktop/DBus/Local"
LOCAL_INTERFACE = "org.freedesktop.DBus.Local"

_FIXED = {"l": struct.Struct("<4xIII"), "B": struct.Struct(">4xIII")}
_U32 = {"l": struct.Struct("<I"), "B": struct.Struct(">I")}
_ENDIAN = {ord("l"): "l", ord("B"): "B"}
_FIXED_ALL = {ord("l"): struct.Struct("<BBBBIII"), ord("B"): struct.Struct(">BBBBIII")}  # the 16 bytes

_HEADER_CACHE_MAX_LEN = 512  # longer headers are parsed every time, never cached
_STRING_CACHE_MAX_LEN = 255  # names are at most 255 bytes; a longer string (a path) is checked every time
_ZEROS = [bytes(n) for n in range(8)]
_FORWARD_SENDERS_MAX = 8  # forwarded headers kept per cached field block (one per sender)


class WireCache:
    """What the header parser remembers between messages, for one owner (a connection's framer).

    Clients repeat the same header fields message after message, so parsed
    field blocks, validated strings and forwarded-header pieces are kept and
    reused. Each table has a size bound; a full table is cleared whole (cheap,
    and a working set smaller than the bound refills it at once). Nothing in
    here is shared between owners: what one client sends never decides what
    another client's header is read as, and no client can flush another's
    entries. A HeaderView made without a cache parses every message afresh.
    """

    __slots__ = (
        "forward_parts", "headers", "max_forward_parts", "max_headers", "max_sender_fields",
        "max_strings", "reply_serial_at", "sender_fields", "strings",
    )  # fmt: skip

    # Per connection: a client uses a few dozen distinct header blocks; these bounds keep what a
    # client that sends only distinct ones can make the broker hold to a few hundred KiB.
    MAX_HEADERS = 256
    MAX_STRINGS = 1024
    MAX_FORWARD_PARTS = 256
    MAX_SENDER_FIELDS = 64

    def __init__(self, max_headers: int = MAX_HEADERS, max_strings: int = MAX_STRINGS,
                 max_forward_parts: int = MAX_FORWARD_PARTS, max_sender_fields: int = MAX_SENDER_FIELDS):  # fmt: skip
        self.max_headers = max_headers
        self.max_strings = max_strings
        self.max_forward_parts = max_forward_parts
        self.max_sender_fields = max_sender_fields
        # field bytes from offset 12 on (REPLY_SERIAL value left out, see HeaderView) -> parsed fields
        self.headers: dict[bytes, tuple] = {}
        # field-array length * 8 + message type -> offset of the REPLY_SERIAL value in such blocks, as last parsed
        self.reply_serial_at: dict[int, int] = {}
        # (field code, raw bytes) -> the validated string: interface and member names recur in every message
        self.strings: dict[tuple[int, bytes], str] = {}
        # (sender, fields end, byte order) -> the bytes around a forwarded header's fields, for uncached blocks
        self.forward_parts: dict[tuple, tuple[bytes, bytes]] = {}
        # (byte order, sender) -> the encoded SENDER field
        self.sender_fields: dict[tuple[str, str], bytes] = {}

    @classmethod
    def for_bus(cls) -> "WireCache":
        """One cache for all connections of a bus (pass it to every Framer): the bounds the process-wide
        caches had. Less memory per connection and shared hits, but clients share (and evict) entries."""
        return cls(max_headers=4096, max_strings=8192, max_forward_parts=8192, max_sender_fields=65536)

    def __len__(self) -> int:
        """Entries held, all tables together."""
        return (len(self.headers) + len(self.reply_serial_at) + len(self.strings) + len(self.forward_parts)
                + len(self.sender_fields))  # fmt: skip

    def clear(self) -> None:
        for d in (self.headers, self.reply_serial_at, self.strings, self.forward_parts, self.sender_fields):
            d.clear()

    def add_header(self, key: bytes, entry: tuple) -> None:
        if len(self.headers) >= self.max_headers:
            self.headers.clear()
            self.reply_serial_at.clear()
        self.headers[key] = entry

    def string(self, code: int, raw: bytes) -> str:
        """A header string field, validated (see ``_decode_field_string``) once per distinct value.
        Long ones are not kept: the table's bound is a count, so its entries must be small."""
        key = (code, raw)
        s = self.strings.get(key)
        if s is None:
            s = _decode_field_string(code, raw)
            if len(raw) > _STRING_CACHE_MAX_LEN:
                return s
            if len(self.strings) >= self.max_strings:
                self.strings.clear()
            self.strings[key] = s
        return s

    def sender_field(self, endian: str, sender: str) -> bytes:
        key = (endian, sender)
        f = self.sender_fields.get(key)
        if f is None:
            f = _sender_field(endian, sender)
            if len(self.sender_fields) >= self.max_sender_fields:
                self.sender_fields.clear()
            self.sender_fields[key] = f
        return f

    def forward_parts_for(self, h: "HeaderView", sender: str) -> tuple[bytes, bytes]:
        key = (sender, h.fields_end, h.endian)
        parts = self.forward_parts.get(key)
        if parts is None:
            if len(self.forward_parts) >= self.max_forward_parts:
                self.forward_parts.clear()
            parts = self.forward_parts[key] = h._forward_parts(sender)
        return parts


def _sender_field(endian: str, sender: str) -> bytes:
    """The encoded SENDER header field (code, signature, value), 8-aligned start."""
    raw = sender.encode()
    return bytes([F_SENDER, 1, ord("s"), 0]) + _U32[endian].pack(len(raw)) + raw + b"\0"


_NAME_CHECKS = {
    F_PATH: names.is_object_path,
    F_INTERFACE: names.is_interface_name,
    F_MEMBER: names.is_member_name,
    F_ERROR_NAME: names.is_error_name,
    F_DESTINATION: names.is_bus_name,
    F_SENDER: names.is_bus_name,
}


def _decode_field_string(code: int, raw: bytes) -> str:
    """Decode and validate a header string field (name syntax, or signature syntax)."""
    if b"\0" in raw:
        raise InvalidValueError("header string contains NUL")
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidValueError("header string is not valid UTF-8") from None
    if code == F_SIGNATURE:
        split_signature(s)
    elif not _NAME_CHECKS[code](s):
        raise HeaderError(f"header field {code} has an invalid value {s!r}")
    return s


def message_size(buf, max_size: int = DEFAULT_MAX_MESSAGE_SIZE, offset: int = 0) -> int:
    """Total size announced by the 16 bytes at ``offset``; validates before buffering."""
    if len(buf) - offset < FIXED_HEADER_SIZE:
        raise TruncatedError("fewer than 16 bytes of fixed header")
    fixed = _FIXED_ALL.get(buf[offset])  # one unpack for all of it: this runs for every message
    if fixed is None:
        raise HeaderError(f"invalid endianness byte {buf[offset]!r}")
    _, kind, _, version, body_len, serial, fields_len = fixed.unpack_from(buf, offset)
    if version != 1:
        raise HeaderError(f"unsupported protocol version {version}")
    if not 1 <= kind <= 4:
        raise HeaderError(f"invalid message type {kind}")
    if serial == 0:
        raise HeaderError("serial must not be zero")
    if fields_len > max_size or body_len > max_size:
        raise LimitExceededError("message larger than the maximum size")
    total = FIXED_HEADER_SIZE + fields_len + ((-fields_len) & 7) + body_len
    if total > max_size:
        raise LimitExceededError(f"message of {total} bytes exceeds the maximum of {max_size}")
    return total


def _aligned_u32(raw, pos: int, end: int, u32) -> tuple[int, int]:
    """A header field's UINT32 (or string length) after its zero padding: (value, position after it)."""
    apos = pos + ((-pos) & 3)
    if any(raw[pos:apos]):
        raise HeaderError("non-zero padding in header field")
    if apos + 4 > end:
        raise TruncatedError("header field ends early")
    return u32.unpack_from(raw, apos)[0], apos + 4


class HeaderView:
    """Parsed header of one complete message held in ``raw`` (not copied)."""

    __slots__ = (
        "body_len", "cache", "destination", "endian", "error_name", "fields_end", "flags", "fwd", "header_len",
        "interface", "member", "path", "raw", "reply_serial", "sender", "serial",
        "signature", "type", "unix_fds", "unknown_fields",
    )  # fmt: skip

    def __init__(self, raw, max_size: int = DEFAULT_MAX_MESSAGE_SIZE, sized: bool = False,  # noqa: C901
                 cache: WireCache | None = None):  # fmt: skip
        """``sized``: the framer already validated the fixed header and cut ``raw`` to its announced size.
        ``cache``: its owner's WireCache (None: parse afresh, keep nothing)."""
        if not sized:
            if type(raw) is not memoryview:
                raw = memoryview(raw)
            total = message_size(raw, max_size)
            if len(raw) != total:
                raise TruncatedError(f"message is {len(raw)} bytes but its header announces {total}")
        self.raw = raw
        self.cache = cache
        e = raw[0]
        endian = self.endian = _ENDIAN[e]
        _, t, self.flags, _, body_len, self.serial, fields_len = _FIXED_ALL[e].unpack_from(raw, 0)  # one unpack
        self.type = t
        self.body_len = body_len
        header_len = self.header_len = len(raw) - body_len
        fields_end = self.fields_end = FIXED_HEADER_SIZE + fields_len
        # Clients repeat the same header fields (path, interface, member,
        # destination, signature) message after message; only the serial,
        # which lives in the fixed header, changes, and in replies the
        # REPLY_SERIAL value. Parse each distinct field block once; for a
        # block shape known to carry a REPLY_SERIAL, its 4 value bytes are left
        # out of the key (every byte before them is in the key, so they are
        # that field's value in any message that matches).
        key = rs = None
        if cache is not None and header_len <= _HEADER_CACHE_MAX_LEN:
            rs = cache.reply_serial_at.get(fields_len * 8 + t) if t != METHOD_CALL else None
            if rs is None:
                key = raw[12:header_len].tobytes()
            else:
                key = raw[12:rs].tobytes() + raw[rs + 4 : header_len].tobytes()
            cached = cache.headers.get(key)
            # the key holds the field bytes; byte order and type are checked against the entry
            if cached is not None and cached[0] is endian and cached[1] == t:
                (_, _, self.path, self.interface, self.member, self.error_name, self.reply_serial,
                 self.destination, self.sender, self.signature, self.unix_fds,
                 self.unknown_fields, self.fwd) = cached  # fmt: skip
                if rs is not None:
                    v = self.reply_serial = _U32[endian].unpack_from(raw, rs)[0]
                    if not v:
                        raise HeaderError("REPLY_SERIAL must not be zero")
                if body_len and not self.signature:
                    raise HeaderError("message has a body but no SIGNATURE")
                return
        self.path = self.interface = self.member = self.error_name = None
        self.destination = self.sender = None
        self.reply_serial = 0
        self.signature = ""
        self.unix_fds = 0
        self.unknown_fields = 0
        self.fwd = None
        rs_at = self._parse_fields(raw, endian, fields_end)
        for i in range(fields_end, header_len):
            if raw[i]:
                raise HeaderError("non-zero padding after the header fields")
        self._check_required()
        if key is not None:
            # The key must leave out exactly this block's REPLY_SERIAL value, or nothing: the lookup
            # went by the shape's last known offset, which need not be this block's.
            if rs_at and t != METHOD_CALL:
                cache.reply_serial_at[fields_len * 8 + t] = rs_at
                if rs != rs_at:
                    key = raw[12:rs_at].tobytes() + raw[rs_at + 4 : header_len].tobytes()
            else:
                if rs is not None:
                    key = raw[12:header_len].tobytes()
                self.fwd = {}  # the whole field block is in the key: its forwarded form can be kept too
            cache.add_header(key, (
                endian, t, self.path, self.interface, self.member, self.error_name, self.reply_serial,
                self.destination, self.sender, self.signature, self.unix_fds, self.unknown_fields, self.fwd,
            ))  # fmt: skip

    def _parse_fields(self, raw, endian: str, end: int) -> int:  # noqa: C901
        """Parse and validate the field array; returns where the REPLY_SERIAL value is (0: none)."""
        u32 = _U32[endian]
        decode = _decode_field_string if self.cache is None else self.cache.string
        pos = FIXED_HEADER_SIZE
        seen = 0
        rs_at = 0
        while pos < end:
            pad = (-pos) & 7
            if pad:
                if any(raw[pos : pos + pad]):
                    raise HeaderError("non-zero padding between header fields")
                pos += pad
            if pos + 4 > end:
                raise TruncatedError("header field array ends inside a field")
            code = raw[pos]
            sig_bytes = bytes(raw[pos + 1 : pos + 4])
            expected = _FIELD_SIG_BYTES.get(code)
            if code == 0:
                raise HeaderError("header field code 0 is invalid")
            if expected is None:
                if code == F_CONTAINER_INSTANCE:
                    # not in the spec, but libdbus (1.14) knows it: an object path, at most once. A
                    # message libdbus would call corrupted is refused here too.
                    if sig_bytes != b"\x01o\x00":
                        raise HeaderError("header field 10 (CONTAINER_INSTANCE) must be an object path")
                    if seen & (1 << code):
                        raise HeaderError("header field 10 appears twice")
                    seen |= 1 << code
                # Unknown field: validate it fully, then drop it.
                r = Reader(raw[:end], endian, pos + 1)
                r.value("v")
                pos = r.pos
                self.unknown_fields += 1
                continue
            if sig_bytes != expected:
                raise HeaderError(f"header field {code} has the wrong type signature")
            if seen & (1 << code):
                raise HeaderError(f"header field {code} appears twice")
            seen |= 1 << code
            pos += 4
            t = FIELD_TYPES[code]
            if t == "u":
                v, pos = _aligned_u32(raw, pos, end, u32)
                if code == F_REPLY_SERIAL:
                    if v == 0:
                        raise HeaderError("REPLY_SERIAL must not be zero")
                    self.reply_serial = v
                    rs_at = pos - 4
                else:
                    self.unix_fds = v
                continue
            if t == "g":
                if pos + 1 > end:
                    raise TruncatedError("header field ends early")
                n = raw[pos]
                pos += 1
            else:
                n, pos = _aligned_u32(raw, pos, end, u32)
            if pos + n + 1 > end:
                raise TruncatedError("header string runs past the header")
            if raw[pos + n] != 0:
                raise HeaderError("header string is not NUL-terminated")
            s = decode(code, bytes(raw[pos : pos + n]))
            pos += n + 1
            if code == F_PATH:
                self.path = s
            elif code == F_INTERFACE:
                self.interface = s
            elif code == F_MEMBER:
                self.member = s
            elif code == F_ERROR_NAME:
                self.error_name = s
            elif code == F_DESTINATION:
                self.destination = s
            elif code == F_SENDER:
                self.sender = s
            else:
                self.signature = s
        if pos != end:
            raise HeaderError("header field array length does not match its contents")
        return rs_at

    def _check_required(self) -> None:
        t = self.type
        if t == METHOD_CALL:
            if self.path is None or self.member is None:
                raise HeaderError("method call lacks PATH or MEMBER")
        elif t == SIGNAL:
            if self.path is None or self.interface is None or self.member is None:
                raise HeaderError("signal lacks PATH, INTERFACE or MEMBER")
        elif t == ERROR:
            if self.error_name is None or not self.reply_serial:
                raise HeaderError("error lacks ERROR_NAME or REPLY_SERIAL")
        elif not self.reply_serial:
            raise HeaderError("method return lacks REPLY_SERIAL")
        if self.body_len and not self.signature:
            raise HeaderError("message has a body but no SIGNATURE")
        if self.path == LOCAL_PATH or self.interface == LOCAL_INTERFACE:
            raise HeaderError("the org.freedesktop.DBus.Local path/interface is reserved")

    # -- access -----------------------------------------------------------

    @property
    def body(self) -> memoryview:
        raw = self.raw
        return raw[self.header_len :] if type(raw) is memoryview else memoryview(raw)[self.header_len :]

    @property
    def no_reply_expected(self) -> bool:
        return bool(self.flags & NO_REPLY_EXPECTED)

    def unmarshal_body(self) -> tuple:
        """Full body unmarshal: for the driver and for argN match rules only."""
        return unmarshal(self.signature, self.body, self.endian, self.unix_fds)

    def forward(self, sender: str | None) -> list:
        """The message as the bus forwards it, as buffers for sendmsg: the header with SENDER
        set and unknown fields stripped, then the body view (never copied).

        Fast path (no SENDER from the client, no unknown fields): the client's
        field bytes are kept as they are and a SENDER field is appended; every
        field starts 8-aligned, so appending is valid. Bytes 0..11 (which hold
        the serial) are the client's own; the rest of the header depends only
        on the field block and the sender, so for a cached block it is kept.
        """
        if sender is None or self.sender is not None or self.unknown_fields:
            return [self._encode_forward(sender), self.body]
        fwd = self.fwd
        if fwd is None:  # a field block of its own (a reply: REPLY_SERIAL differs every time)
            cache = self.cache
            if cache is None:
                parts = self._forward_parts(sender)
            else:  # WireCache.forward_parts_for(), its hit inlined: once per reply
                parts = cache.forward_parts.get((sender, self.fields_end, self.endian))
                if parts is None:
                    parts = cache.forward_parts_for(self, sender)
            return [self.raw[0:12], parts[0], self.raw[FIXED_HEADER_SIZE : self.fields_end], parts[1], self.body]
        rest = fwd.get(sender)
        if rest is None:
            if len(fwd) >= _FORWARD_SENDERS_MAX:
                fwd.clear()
            rest = fwd[sender] = self._forward_rest(sender)
        return [self.raw[0:12], rest, self.body]

    def forward_header(self, sender: str | None) -> bytes:
        """The forwarded header as one bytes object (see :meth:`forward`)."""
        return b"".join(self.forward(sender)[:-1])

    def _forward_rest(self, sender: str) -> bytes:
        """Header bytes from offset 12 on: new field array length, the client's fields, SENDER, padding."""
        before, after = self._forward_parts(sender)
        return b"".join((before, self.raw[FIXED_HEADER_SIZE : self.fields_end], after))

    def _forward_parts(self, sender: str) -> tuple[bytes, bytes]:
        """What goes around the client's field bytes: the new field array length, then SENDER and padding.
        Both depend only on where the fields end, the byte order and the sender."""
        endian = self.endian
        fe = self.fields_end
        pad = (-fe) & 7
        sf = _sender_field(endian, sender) if self.cache is None else self.cache.sender_field(endian, sender)
        fields_len = fe - FIXED_HEADER_SIZE + pad + len(sf)
        tail = (-(FIXED_HEADER_SIZE + fields_len)) & 7
        return _U32[endian].pack(fields_len), _ZEROS[pad] + sf + _ZEROS[tail]

    def _encode_forward(self, sender: str | None) -> bytes:
        return encode_header(
            self.endian, self.type, self.flags, self.body_len, self.serial,
            path=self.path, interface=self.interface, member=self.member,
            error_name=self.error_name, reply_serial=self.reply_serial,
            destination=self.destination, sender=sender, signature=self.signature,
            unix_fds=self.unix_fds,
        )  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"<{TYPE_NAMES.get(self.type)} serial={self.serial} path={self.path} "
            f"iface={self.interface} member={self.member} dest={self.destination} "
            f"sender={self.sender} sig={self.signature!r}>"
        )


def encode_header(
    endian: str, msg_type: int, flags: int, body_len: int, serial: int, *,
    path=None, interface=None, member=None, error_name=None, reply_serial=0,
    destination=None, sender=None, signature="", unix_fds=0,
) -> bytes:  # fmt: skip
    """Marshal a complete, padded message header."""
    u32 = _U32[endian]
    out = bytearray(b"l\0\0\1" if endian == "l" else b"B\0\0\1")
    out[1] = msg_type
    out[2] = flags
    out += bytes(12)

    def string_field(code: int, s: str) -> None:
        out.extend(b"\0" * ((-len(out)) & 7))
        raw = s.encode()
        out.append(code)
        out.extend(_FIELD_SIG_BYTES[code])
        out.extend(u32.pack(len(raw)))
        out.extend(raw)
        out.append(0)

    def u32_field(code: int, v: int) -> None:
        out.extend(b"\0" * ((-len(out)) & 7))
        out.append(code)
        out.extend(_FIELD_SIG_BYTES[code])
        out.extend(u32.pack(v))

    if path is not None:
        string_field(F_PATH, path)
    if interface is not None:
        string_field(F_INTERFACE, interface)
    if member is not None:
        string_field(F_MEMBER, member)
    if error_name is not None:
        string_field(F_ERROR_NAME, error_name)
    if reply_serial:
        u32_field(F_REPLY_SERIAL, reply_serial)
    if destination is not None:
        string_field(F_DESTINATION, destination)
    if sender is not None:
        string_field(F_SENDER, sender)
    if signature:
        out.extend(b"\0" * ((-len(out)) & 7))
        raw = signature.encode()
        out.extend(b"\x08\x01g\x00")
        out.append(len(raw))
        out.extend(raw)
        out.append(0)
    if unix_fds:
        u32_field(F_UNIX_FDS, unix_fds)
    fields_len = len(out) - FIXED_HEADER_SIZE
    out.extend(b"\0" * ((-len(out)) & 7))
    struct.pack_into("<III" if endian == "l" else ">III", out, 4, body_len, serial, fields_len)
    return bytes(out)


def build_message(
    msg_type: int, serial: int, *, signature: str = "", body: tuple = (),
    flags: int = 0, endian: str = "l", **fields: Any,
) -> bytes:  # fmt: skip
    """Build a complete message (used for what the bus itself sends)."""
    w = Writer(endian)
    if signature:
        types = split_signature(signature)
        if len(types) != len(body):
            raise WireError(f"signature {signature!r} needs {len(types)} values")
        for t, v in zip(types, body, strict=True):
            w.value(t, v)
    hdr = encode_header(endian, msg_type, flags, len(w.buf), serial, signature=signature, **fields)
    return hdr + bytes(w.buf)


def method_return(serial: int, reply_to: int, destination: str | None, signature="", body=()):
    return build_message(
        METHOD_RETURN, serial, reply_serial=reply_to, destination=destination,
        sender="org.freedesktop.DBus", signature=signature, body=body,
        flags=NO_REPLY_EXPECTED,
    )  # fmt: skip


def error_message(serial: int, reply_to: int, destination: str | None, name: str, text: str):
    return build_message(
        ERROR, serial, reply_serial=reply_to, destination=destination, error_name=name,
        sender="org.freedesktop.DBus", signature="s", body=(text,), flags=NO_REPLY_EXPECTED,
    )  # fmt: skip


def signal_message(serial, path, interface, member, signature="", body=(), destination=None):
    return build_message(
        SIGNAL, serial, path=path, interface=interface, member=member,
        destination=destination, sender="org.freedesktop.DBus",
        signature=signature, body=body, flags=NO_REPLY_EXPECTED,
    )  # fmt: skip
