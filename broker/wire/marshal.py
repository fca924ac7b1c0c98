"""Marshalling and strict unmarshalling of D-Bus values, both endiannesses.

Python mapping: integer types and ``h`` (an index into the message's fds) are
``int``, ``b`` is ``bool``, ``d`` is ``float``, ``s``/``o``/``g`` are ``str``,
``ay`` unmarshals to ``bytes``, other arrays to ``list``, ``a{..}`` to
``dict`` (or, with ``pairs``, to the list of its (key, value) entries as on the
wire: the wire allows a key twice, a dict keeps one), structs to ``tuple`` and variants to :class:`Variant`.

Alignment is relative to the start of the buffer, which must itself be
8-aligned in the message (the header and the body both are).
"""

import struct
from typing import Any, NamedTuple

from . import name_syntax as names
from .errors import (
    FdIndexError,
    InvalidValueError,
    LimitExceededError,
    PaddingError,
    SignatureError,
    TruncatedError,
    WireError,
)
from .signature import ALIGNMENT, MAX_TOTAL_DEPTH, split_signature

MAX_ARRAY_LENGTH = 64 * 1024 * 1024

_INT_CODES = {"y": "B", "n": "h", "q": "H", "i": "i", "u": "I", "x": "q", "t": "Q", "h": "I", "d": "d"}
_STRUCTS = {(e, c): struct.Struct(("<" if e == "l" else ">") + f) for e in "lB" for c, f in _INT_CODES.items()}
_U32 = {"l": struct.Struct("<I"), "B": struct.Struct(">I")}
_INT_RANGES = {
    "y": (0, 0xFF), "n": (-0x8000, 0x7FFF), "q": (0, 0xFFFF), "i": (-(2**31), 2**31 - 1),
    "u": (0, 2**32 - 1), "x": (-(2**63), 2**63 - 1), "t": (0, 2**64 - 1), "h": (0, 2**32 - 1),
}  # fmt: skip


class Variant(NamedTuple):
    """A variant value: its single complete type and the value."""

    signature: str
    value: Any


def _pad(pos: int, align: int) -> int:
    return (-pos) & (align - 1)


class Reader:
    """Strict reader over a buffer; raises a WireError subclass on any violation."""

    __slots__ = ("buf", "endian", "n_fds", "pairs", "pos")

    def __init__(self, buf, endian: str = "l", pos: int = 0, n_fds: int = 0, pairs: bool = False):
        self.buf = memoryview(buf).cast("B") if not isinstance(buf, bytes) else buf
        self.endian = endian
        self.pos = pos
        self.n_fds = n_fds
        self.pairs = pairs  # dict entries as a list of (key, value), duplicates kept

    def align(self, n: int) -> None:
        pad = _pad(self.pos, n)
        if pad:
            end = self.pos + pad
            if end > len(self.buf):
                raise TruncatedError("data ends inside alignment padding")
            if any(self.buf[self.pos : end]):
                raise PaddingError(f"non-zero padding at offset {self.pos}")
            self.pos = end

    def take(self, n: int):
        end = self.pos + n
        if end > len(self.buf):
            raise TruncatedError(f"need {n} bytes at offset {self.pos}, have {len(self.buf) - self.pos}")
        chunk = self.buf[self.pos : end]
        self.pos = end
        return chunk

    def fixed(self, code: str):
        st = _STRUCTS[(self.endian, code)]
        self.align(st.size)
        end = self.pos + st.size
        if end > len(self.buf):
            raise TruncatedError(f"data ends inside a {code!r} value at offset {self.pos}")
        (v,) = st.unpack_from(self.buf, self.pos)
        self.pos = end
        return v

    def u32(self) -> int:
        return self.fixed("u")

    def string(self, code: str = "s") -> str:
        if code == "g":
            n = self.take(1)[0]
        else:
            n = self.u32()
        raw = bytes(self.take(n))
        if self.take(1)[0] != 0:
            raise InvalidValueError(f"string at offset {self.pos - n - 1} is not NUL-terminated")
        if b"\0" in raw:
            raise InvalidValueError("string contains an embedded NUL")
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidValueError(f"string is not valid UTF-8: {e.reason}") from None
        if code == "o":
            names.check_object_path(s)
        elif code == "g":
            split_signature(s)
        return s

    def value(self, t: str, depth: int = 0):
        if depth > MAX_TOTAL_DEPTH:
            raise LimitExceededError(f"values nest deeper than {MAX_TOTAL_DEPTH}")
        c = t[0]
        if c in "sog":
            return self.string(c)
        if c == "b":
            v = self.fixed("u")
            if v > 1:
                raise InvalidValueError(f"boolean value {v} is neither 0 nor 1")
            return bool(v)
        if c == "h":
            v = self.fixed("h")
            if v >= self.n_fds:
                raise FdIndexError(f"fd index {v} but the message carries {self.n_fds} fds")
            return v
        if c in _INT_CODES:
            return self.fixed(c)
        if c == "a":
            return self.array(t, depth)
        if c == "(":
            self.align(8)
            return tuple(self.value(m, depth + 1) for m in split_signature(t[1:-1]))
        if c == "v":
            sig = self.string("g")
            types = split_signature(sig)
            if len(types) != 1:
                raise InvalidValueError(f"variant signature {sig!r} is not one complete type")
            return Variant(sig, self.value(sig, depth + 1))
        raise SignatureError(f"unknown type code {c!r}")

    def array(self, t: str, depth: int):
        n = self.u32()
        if n > MAX_ARRAY_LENGTH:
            raise LimitExceededError(f"array of {n} bytes exceeds {MAX_ARRAY_LENGTH}")
        elem = t[1:]
        self.align(ALIGNMENT[elem[0]])  # padding is present even for an empty array
        end = self.pos + n
        if end > len(self.buf):
            raise TruncatedError(f"array of {n} bytes runs past the end of the data")
        if elem == "y":
            data = bytes(self.take(n))
            return data
        if elem[0] == "{":
            k, v = split_signature(elem[1:-1])
            entries = []
            while self.pos < end:
                self.align(8)
                key = self.value(k, depth + 1)
                entries.append((key, self.value(v, depth + 1)))
            if self.pos != end:
                raise InvalidValueError("array contents do not match its length")
            return entries if self.pairs else dict(entries)
        items = []
        while self.pos < end:
            items.append(self.value(elem, depth + 1))
        if self.pos != end:
            raise InvalidValueError("array contents do not match its length")
        return items


class Writer:
    """Append-only marshaller; ``pos`` offsets are relative to ``base``."""

    __slots__ = ("base", "buf", "endian")

    def __init__(self, endian: str = "l", base: int = 0):
        self.buf = bytearray()
        self.endian = endian
        self.base = base

    def align(self, n: int) -> None:
        pad = _pad(self.base + len(self.buf), n)
        if pad:
            self.buf += b"\0" * pad

    def fixed(self, code: str, v) -> None:
        st = _STRUCTS[(self.endian, code)]
        self.align(st.size)
        self.buf += st.pack(v)

    def string(self, s: str, code: str = "s") -> None:
        if not isinstance(s, str):
            raise InvalidValueError(f"expected str for {code!r}, got {type(s).__name__}")
        raw = s.encode("utf-8")
        if b"\0" in raw:
            raise InvalidValueError("string contains NUL")
        if code == "o":
            names.check_object_path(s)
        if code == "g":
            split_signature(s)
            if len(raw) > 255:
                raise SignatureError("signature too long")
            self.buf.append(len(raw))
        else:
            self.fixed("u", len(raw))
        self.buf += raw
        self.buf.append(0)

    def value(self, t: str, v, depth: int = 0) -> None:  # noqa: C901
        if depth > MAX_TOTAL_DEPTH:
            raise LimitExceededError(f"values nest deeper than {MAX_TOTAL_DEPTH}")
        c = t[0]
        try:
            if c in "sog":
                self.string(v, c)
            elif c == "b":
                if not isinstance(v, (bool, int)) or v not in (0, 1):
                    raise InvalidValueError(f"boolean must be True/False, got {v!r}")
                self.fixed("u", int(v))
            elif c == "d":
                self.fixed("d", float(v))
            elif c in _INT_RANGES:
                lo, hi = _INT_RANGES[c]
                if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                    raise InvalidValueError(f"{v!r} is not a valid {c!r} value")
                self.fixed(c, v)
            elif c == "a":
                self.array(t, v, depth)
            elif c == "(":
                members = split_signature(t[1:-1])
                if not isinstance(v, (tuple, list)) or len(v) != len(members):
                    raise InvalidValueError(f"struct {t} needs {len(members)} fields")
                self.align(8)
                for m, x in zip(members, v, strict=True):
                    self.value(m, x, depth + 1)
            elif c == "v":
                sig, inner = v
                if len(split_signature(sig)) != 1:
                    raise InvalidValueError(f"variant signature {sig!r} is not one complete type")
                self.string(sig, "g")
                self.value(sig, inner, depth + 1)
            else:
                raise SignatureError(f"unknown type code {c!r}")
        except struct.error as e:
            raise InvalidValueError(str(e)) from None

    def array(self, t: str, v, depth: int) -> None:
        elem = t[1:]
        self.fixed("u", 0)
        len_at = len(self.buf) - 4
        self.align(ALIGNMENT[elem[0]])
        start = len(self.buf)
        if elem == "y":
            self.buf += bytes(v)
        elif elem[0] == "{":
            k, vt = split_signature(elem[1:-1])
            items = v.items() if isinstance(v, dict) else v
            for key, val in items:
                self.align(8)
                self.value(k, key, depth + 1)
                self.value(vt, val, depth + 1)
        else:
            for x in v:
                self.value(elem, x, depth + 1)
        n = len(self.buf) - start
        if n > MAX_ARRAY_LENGTH:
            raise LimitExceededError(f"array of {n} bytes exceeds {MAX_ARRAY_LENGTH}")
        _U32[self.endian].pack_into(self.buf, len_at, n)


def marshal(signature: str, values, endian: str = "l", base: int = 0) -> bytes:
    """Marshal a tuple of ``values`` matching ``signature``."""
    types = split_signature(signature)
    if len(types) != len(values):
        raise InvalidValueError(f"signature {signature!r} needs {len(types)} values, got {len(values)}")
    w = Writer(endian, base)
    for t, v in zip(types, values, strict=True):
        w.value(t, v)
    return bytes(w.buf)


def unmarshal(signature: str, buf, endian: str = "l", n_fds: int = 0, pairs: bool = False) -> tuple:
    """Unmarshal all of ``buf`` as ``signature``; trailing bytes are an error."""
    r = Reader(buf, endian, 0, n_fds, pairs)
    out = tuple(r.value(t) for t in split_signature(signature))
    if r.pos != len(r.buf):
        raise InvalidValueError(f"{len(r.buf) - r.pos} bytes left after the body")
    return out


__all__ = ["MAX_ARRAY_LENGTH", "Reader", "Variant", "WireError", "Writer", "marshal", "unmarshal"]
