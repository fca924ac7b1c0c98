"""Body validation: a walk over a message body's bytes against its signature.

Every message a client sends is checked here before it is routed, so a
receiver never gets a body that breaks the D-Bus rules (libdbus receivers
treat such a stream as corrupt and drop off the bus). Nothing is unmarshalled:
the walk reads lengths and the few values that have a restricted domain
(booleans, fd indexes) and checks bytes in place; the bytes that are
forwarded are the ones that were checked.

What is checked, as the specification and libdbus require: alignment padding
is zero (also before the elements of an empty array); ``b`` is 0 or 1;
``s`` is UTF-8 without NUL and NUL-terminated; ``o`` is a valid object path;
``g`` and a variant's signature are valid signatures, a variant's one single
complete type; arrays are at most 64 MiB and end exactly on an element
boundary; ``h`` is below the header's UNIX_FDS; the body is consumed exactly.
Value nesting follows libdbus: each struct, dict entry, element of an array of
non-fixed elements and variant value is one level deeper, and no value may be
deeper than 64 (so variants cannot nest without bound).

A signature is compiled once into a *plan* (a small tree of closures; a
fixed-layout body becomes a length check plus the few offsets that need a
look). Plans live in a :class:`BodyChecker`'s bounded cache, one checker per
framer, so one client's signatures never evict another's.

Large bodies are checked in steps (:meth:`BodyChecker.steps`): the cost of the walk grows with the
number of values, so a dense 32 MiB body costs seconds of pure Python. A body over
``INCREMENTAL_MIN`` bytes is walked by a generator that yields after every ``SLICE`` bytes of
array elements (and after every array), so the I/O shell interleaves other connections' work between
steps. Each compiled check ``fn`` has a resumable twin ``fn.gen`` (None when the type holds no array
and no variant: its cost is bounded by its signature). Inside an array the elements are still
walked by the one-shot checks, on a view of the buffer cut ``SLICE`` bytes ahead: the one-shot walk
reads bytes in order and every check that depends on the buffer's end raises TruncatedError, so on
the cut view it either gives the one-shot verdict on the same bytes or stops with TruncatedError at
an element that crosses the cut; such an element is walked from the next step on, and one that
alone is larger than a step is walked by its resumable twin. Small bodies never see any of this.
"""

import re
import struct

from .errors import (
    FdIndexError,
    InvalidNameError,
    InvalidValueError,
    LimitExceededError,
    PaddingError,
    SignatureError,
    TruncatedError,
)
from .signature import ALIGNMENT, FIXED_SIZE, split_signature, struct_members

MAX_ARRAY_LENGTH = 64 * 1024 * 1024
MAX_DEPTH = 64  # libdbus: 2 * DBUS_MAXIMUM_TYPE_RECURSION_DEPTH, variants included
# A checker keeps at most this many compiled signatures (header and variant), of at most this
# many type codes in all: a plan takes about 200 bytes per type code, so one checker holds at
# most about 200 KiB however many distinct signatures its client sends (typically a few KiB).
MAX_PLANS = 128
MAX_PLAN_CODES = 1024

_U32 = {"l": struct.Struct("<I").unpack_from, "B": struct.Struct(">I").unpack_from}
_ZEROS = [bytes(n) for n in range(8)]
_PATH = re.compile(rb"/|(?:/[A-Za-z0-9_]+)+")
# A longer object path is checked with bytes operations in C, not the regular expression (2.8 s for
# one of 32 MiB: a step cannot split one value).
PATH_REGEX_MAX = 4096
_PATH_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_/"


def _valid_long_path(b, e: int, q: int) -> bool:
    """What ``_PATH`` accepts: "/", or "/" then elements of [A-Za-z0-9_]+ separated by single "/"."""
    path = bytes(b[e:q])
    return path[:1] == b"/" and path[-1:] != b"/" and not path.translate(None, _PATH_CHARS) and b"//" not in path


# A body of at most this many bytes whose signature has strings is copied once to ``bytes`` before
# the walk (slicing and decoding bytes is cheaper than through a memoryview); a larger one is walked
# in place. Either way the buffer holds the body 8-aligned, as alignment is relative to its start.
COPY_MAX = 16 * 1024
# Bodies larger than this are checked in steps (see the module docstring); a step walks about SLICE
# bytes of array elements (about 1.5 ms of pure Python for the densest bodies, ~12 MiB/s).
INCREMENTAL_MIN = 64 * 1024
SLICE = 16 * 1024


def _truncated(p: int, what: str):
    return TruncatedError(f"body ends inside {what} at offset {p}")


def _bad_pad(b, p: int, q: int):
    if q > len(b):
        return _truncated(p, "alignment padding")
    return PaddingError(f"non-zero padding at offset {p}")


def _basic(c: str, endian: str):  # noqa: C901
    """The check of one value of basic type ``c`` other than ``g``: ``(buf, pos, depth, n_fds) -> pos after``.

    Every check has this shape: ``depth`` is the nesting added by enclosing variants, ``n_fds`` the
    message's UNIX_FDS. Basic checks hold no state, so they are built once per byte order.

    The alignment padding check (``if p & 3: q = ...; if b[p:q] != _ZEROS[q - p]: ...``) is written
    out in every check that runs once per value (here, structs, arrays, dict entries) on purpose: a
    shared ``_pad()`` call there cost 5-13% on dense bodies (``a{sv}``, ``as``) and on
    PropertiesChanged when measured. The resumable walks reuse these checks (head-only closures
    built from the same code) rather than repeat them.
    """
    u32 = _U32[endian]
    if c == "y":

        def byte(b, p, d, f):
            if p >= len(b):
                raise _truncated(p, "a byte")
            return p + 1

        return byte
    if c == "b":

        def boolean(b, p, d, f):
            if p & 3:
                q = (p + 3) & -4
                if b[p:q] != _ZEROS[q - p]:
                    raise _bad_pad(b, p, q)
                p = q
            if p + 4 > len(b):
                raise _truncated(p, "a boolean")
            if u32(b, p)[0] > 1:
                raise InvalidValueError(f"boolean value {u32(b, p)[0]} at offset {p} is neither 0 nor 1")
            return p + 4

        return boolean
    if c == "h":

        def fd_index(b, p, d, f):
            if p & 3:
                q = (p + 3) & -4
                if b[p:q] != _ZEROS[q - p]:
                    raise _bad_pad(b, p, q)
                p = q
            if p + 4 > len(b):
                raise _truncated(p, "an fd index")
            if u32(b, p)[0] >= f:
                raise FdIndexError(f"fd index {u32(b, p)[0]} but the message carries {f} fds")
            return p + 4

        return fd_index
    if c in FIXED_SIZE:
        size = FIXED_SIZE[c]
        m = size - 1

        def fixed(b, p, d, f):
            if p & m:
                q = (p + m) & ~m
                if b[p:q] != _ZEROS[q - p]:
                    raise _bad_pad(b, p, q)
                p = q
            p += size
            if p > len(b):
                raise _truncated(p - size, f"a {c!r} value")
            return p

        return fixed
    is_path = c == "o"

    def string(b, p, d, f):
        if p & 3:
            q = (p + 3) & -4
            if b[p:q] != _ZEROS[q - p]:
                raise _bad_pad(b, p, q)
            p = q
        e = p + 4
        end = len(b)
        if e > end:
            raise _truncated(p, "a string length")
        q = e + u32(b, p)[0]
        if q >= end:
            raise TruncatedError(f"string at offset {p} runs past the end of the body")
        if b[q]:
            raise InvalidValueError(f"string at offset {p} is not NUL-terminated")
        if is_path:
            if _PATH.fullmatch(b, e, q) is None if q - e <= PATH_REGEX_MAX else not _valid_long_path(b, e, q):
                raise InvalidNameError(f"invalid object path at offset {p}")
        elif q > e:
            # Decoding is the cheapest complete UTF-8 check measured (strict: no surrogates, no
            # overlong forms, nothing past U+10FFFF, as libdbus); NUL is valid UTF-8, so it is looked for.
            try:
                s = str(b[e:q], "utf-8")
            except UnicodeDecodeError as err:
                raise InvalidValueError(f"string at offset {p} is not valid UTF-8: {err.reason}") from None
            if "\0" in s:
                raise InvalidValueError(f"string at offset {p} contains NUL")
        return q + 1

    return string


_BASIC = {e: {c: _basic(c, e) for c in "ybnqiuxtdhso"} for e in "lB"}
for _fns in _BASIC.values():
    for _fn in _fns.values():
        _fn.gen = None  # a basic value's cost is bounded (a string's by its bytes, in C)
_BASIC_CODES = {e: {ord(c): fn for c, fn in _BASIC[e].items()} for e in "lB"}  # variant "one basic type" path


class BodyChecker:
    """Validates message bodies; holds compiled plans (bounded) for the signatures it has seen."""

    __slots__ = ("_codes", "plans")

    def __init__(self):
        # header signature (str) -> plan of a whole body; variant/``g`` signature (bytes) -> check of
        # one value. Big-endian keys carry a "B" prefix (never a type code: no collision). Read by the
        # framer on its hot path (plan(raw, header_len, unix_fds) validates a whole body); emptied in place.
        self.plans: dict = {}
        self._codes = 0  # type codes in the cached signatures

    def check(self, h) -> None:
        """Validate the body of the parsed message ``h`` (a HeaderView); raises WireError."""
        sig = h.signature
        endian = h.endian
        plan = self.plans.get(sig if endian == "l" else "B" + sig)
        if plan is None:
            plan = self._top_plan(sig, endian)
        plan(h.raw, h.header_len, h.unix_fds)

    def steps(self, h):
        """Validate the body of ``h`` like :meth:`check`, in steps: returns None when it is checked
        already (fixed layouts cost no more for being large), else a generator to be advanced with
        ``next()`` until StopIteration, each step a bounded amount of work; raises WireError."""
        sig = h.signature
        endian = h.endian
        plan = self.plans.get(sig if endian == "l" else "B" + sig)
        if plan is None:
            plan = self._top_plan(sig, endian)
        gen = getattr(plan, "gen", None)
        if gen is None:
            plan(h.raw, h.header_len, h.unix_fds)
            return None
        return gen(h.raw, h.header_len, h.unix_fds)

    def check_body(self, signature: str, body, endian: str = "l", n_fds: int = 0) -> None:
        """Validate ``body`` (which must start 8-aligned in its message) against ``signature``."""
        split_signature(signature)
        plan = self.plans.get(signature if endian == "l" else "B" + signature)
        if plan is None:
            plan = self._top_plan(signature, endian)
        plan(memoryview(body).cast("B"), 0, n_fds)

    # -- plan cache -----------------------------------------------------------

    def _store(self, key, plan):
        plans = self.plans
        if len(plans) >= MAX_PLANS or self._codes + len(key) > MAX_PLAN_CODES:
            plans.clear()
            self._codes = 0
        plans[key] = plan
        self._codes += len(key)
        return plan

    def _top_plan(self, sig: str, endian: str):
        """The plan for a whole body of signature ``sig`` (already validated by the header view)."""
        types = split_signature(sig)
        layout = _fixed_layout(types)
        if layout is not None:
            plan = _fixed_body_plan(layout, endian)
        else:
            fns = [self._compile(t, 0, endian) for t in types]
            walk = self._sequence(fns)
            copy = any(c in sig for c in "sogv")

            def plan(b, start, f):
                if copy and len(b) - start <= COPY_MAX:
                    b = bytes(b[start:])
                    start = 0
                end = walk(b, start, 0, f)
                if end != len(b):
                    raise InvalidValueError(f"{len(b) - end} bytes left after the body")

            plan.gen = _top_gen(fns) if any(fn.gen for fn in fns) else None

        return self._store(sig if endian == "l" else "B" + sig, plan)

    def _signature_value(self, raw: bytes, endian: str):
        """Validate the signature bytes ``raw`` from a body; the check of its single complete type, or
        False if it is valid but not one single complete type (fine for ``g``, not for ``v``)."""
        key = raw if endian == "l" else b"B" + raw
        plan = self.plans.get(key)
        if plan is not None:
            return plan
        if not raw.isascii():
            raise SignatureError("signature value is not ASCII")
        types = split_signature(raw.decode())  # at most 255 bytes: its length is one byte
        plan = self._compile(types[0], 0, endian) if len(types) == 1 else False
        return self._store(key, plan)

    # -- compilation ----------------------------------------------------------

    @staticmethod
    def _sequence(fns):
        """The check of consecutive values."""
        if len(fns) == 1:
            return fns[0]

        def walk(b, p, d, f):
            for fn in fns:
                p = fn(b, p, d, f)
            return p

        return walk

    def _compile(self, t: str, depth: int, endian: str):
        """The check of one value of type ``t`` at static nesting ``depth`` within its signature."""
        c = t[0]
        if c in "gv":
            return self._signature(c == "v", depth + 1, endian)
        if c == "(":
            members = [self._compile(m, depth + 1, endian) for m in struct_members(t)]
            fn = self._struct(members, depth + 1)
            fn.gen = _struct_gen(fn.head, members) if any(m.gen for m in members) else None
            return fn
        if c == "a":
            return self._array(t[1:], depth, endian)
        if c == "{":
            raise SignatureError(f"type {t!r} cannot stand here")  # only as an array element
        return _BASIC[endian][c]

    def _signature(self, variant: bool, inner: int, endian: str):  # noqa: C901
        """``g``, or ``v`` (a signature, then one value of it, one level deeper)."""
        sig_value = self._signature_value
        simple = _BASIC_CODES[endian]

        def make(value_at: bool):
            # value_at: the check of only a variant's signature, for variant_gen: (its value's check,
            # where the value starts). A second closure, not an argument: no cost to the one-shot check.
            def signature(b, p, d, f):
                if p >= len(b):
                    raise _truncated(p, "a signature length")
                n = b[p]
                q = p + 1 + n
                if q >= len(b):
                    raise TruncatedError(f"signature at offset {p} runs past the end of the body")
                if b[q]:
                    raise InvalidValueError(f"signature at offset {p} is not NUL-terminated")
                if n == 1:
                    plan = simple.get(b[p + 1]) or sig_value(bytes(b[p + 1 : q]), endian)
                elif n:
                    plan = sig_value(bytes(b[p + 1 : q]), endian)
                else:
                    plan = False  # the empty signature: valid, but no type for a variant
                if not variant:
                    return q + 1
                if not plan:
                    raise SignatureError(f"variant signature at offset {p} is not one single complete type")
                if d + inner > MAX_DEPTH:
                    raise LimitExceededError(f"variant at offset {p} nests values deeper than {MAX_DEPTH}")
                if value_at:
                    return plan, q + 1
                return plan(b, q + 1, d + inner, f)

            return signature

        signature = make(False)
        if not variant:
            signature.gen = None
            return signature
        value_at = make(True)

        def variant_gen(b, p, d, f):  # the same, the value walked by its resumable check
            plan, p = value_at(b, p, d, f)
            if plan.gen is None:
                return plan(b, p, d + inner, f)
            return (yield from plan.gen(b, p, d + inner, f))

        signature.gen = variant_gen
        return signature

    def _struct(self, members, inner: int):  # noqa: C901
        """A struct: 8-aligned, its members one level deeper."""

        def make(head: bool):  # head: only the checks before the members, for struct_gen (a closure constant)
            def container(b, p, d, f):
                if p & 7:
                    q = (p + 7) & -8
                    if b[p:q] != _ZEROS[q - p]:
                        raise _bad_pad(b, p, q)
                    p = q
                if d + inner > MAX_DEPTH:
                    raise LimitExceededError(f"struct at offset {p} nests values deeper than {MAX_DEPTH}")
                if head:
                    return p
                for fn in members:
                    p = fn(b, p, d, f)
                return p

            return container

        container = make(False)
        container.head = make(True)
        if len(members) != 2:
            return container
        first, second = members

        def pair(b, p, d, f):  # the same without the loop, and written out: a call less per struct
            if p & 7:
                q = (p + 7) & -8
                if b[p:q] != _ZEROS[q - p]:
                    raise _bad_pad(b, p, q)
                p = q
            if d + inner > MAX_DEPTH:
                raise LimitExceededError(f"struct at offset {p} nests values deeper than {MAX_DEPTH}")
            return second(b, first(b, p, d, f), d, f)

        pair.head = container.head
        return pair

    def _array(self, elem: str, depth: int, endian: str):
        inner = depth + 1
        size = FIXED_SIZE.get(elem, 0)
        if size and elem not in "bh":  # b and h are fixed-size, but each value needs a look
            array = _array_check(False, endian, elem, size, inner)
            array.gen = None  # fixed-size elements: the length says it all
            return array
        if elem[0] == "{":
            return self._dict_array(elem, depth, endian)
        each = self._compile(elem, inner, endian)
        array = _array_check(False, endian, elem, size, inner, each)
        array.gen = _array_gen(_array_check(True, endian, elem, size, inner, each), each, each.gen)
        return array

    def _dict_array(self, elem: str, depth: int, endian: str):
        """``a{kv}``: as an array whose elements are pairs, with the dict entry itself inlined (the most
        common container: every property map)."""
        k, v = struct_members(elem)
        key = self._compile(k, depth + 2, endian)
        value = self._compile(v, depth + 2, endian)
        # the entries are one level deeper than the array, their key and value two
        dict_array = _array_check(False, endian, elem, 0, depth + 2, None, key, value)

        def make(key_only: bool):  # one entry, for the resumable walk (key_only: up to its value, for entry_gen)
            def entry(b, p, d, f):
                if p & 7:
                    q = (p + 7) & -8
                    if b[p:q] != _ZEROS[q - p]:
                        raise _bad_pad(b, p, q)
                    p = q
                p = key(b, p, d, f)
                return p if key_only else value(b, p, d, f)

            return entry

        entry = make(False)
        entry_gen = None
        if value.gen is not None:
            entry_key = make(True)

            def entry_gen(b, p, d, f):
                return (yield from value.gen(b, entry_key(b, p, d, f), d, f))

        head = _array_check(True, endian, elem, 0, depth + 2, None, key, value)
        dict_array.gen = _array_gen(head, entry, entry_gen)
        return dict_array


def _array_check(head: bool, endian: str, elem: str, size: int, inner: int, each=None, key=None, value=None):  # noqa: C901
    """The one-shot check of an array of ``elem`` (``size`` bytes each if fixed, else 0; at static
    nesting ``inner``): its elements are checked by ``each``, or are dict entries of ``key`` and
    ``value``, or (both None) need no look. With ``head`` True, the check of only what precedes the
    elements, returning (first element, end): the resumable walk's first step, from the same code
    (a second closure, not an argument: no cost to the one-shot check).

    Once per array it costs no call of its own; the per-element loops are written out in it (a dict
    entry with no call of its own: the most common container, every property map)."""
    u32 = _U32[endian]
    am = 7 if key is not None else ALIGNMENT[elem[0]] - 1
    what = "dict entry" if key is not None else "array"

    def array(b, p, d, f):  # noqa: C901
        if p & 3:
            q = (p + 3) & -4
            if b[p:q] != _ZEROS[q - p]:
                raise _bad_pad(b, p, q)
            p = q
        if p + 4 > len(b):
            raise _truncated(p, "an array length")
        n = u32(b, p)[0]
        p += 4
        if n > MAX_ARRAY_LENGTH:
            raise LimitExceededError(f"array of {n} bytes exceeds {MAX_ARRAY_LENGTH}")
        if p & am:  # padding to the element alignment, even when the array is empty
            q = (p + am) & ~am
            if b[p:q] != _ZEROS[q - p]:
                raise _bad_pad(b, p, q)
            p = q
        end = p + n
        if end > len(b):
            raise TruncatedError(f"array of {n} bytes at offset {p} runs past the end of the body")
        if size:
            if n % size:
                raise InvalidValueError(f"array of {n} bytes is not a multiple of its {size}-byte elements")
        elif n and d + inner > MAX_DEPTH:
            raise LimitExceededError(f"{what} at offset {p} nests values deeper than {MAX_DEPTH}")
        if head:
            return p, end
        if each is not None:
            while p < end:
                p = each(b, p, d, f)
        elif key is not None:
            while p < end:
                if p & 7:
                    q = (p + 7) & -8
                    if b[p:q] != _ZEROS[q - p]:
                        raise _bad_pad(b, p, q)
                    p = q
                p = value(b, key(b, p, d, f), d, f)
        else:
            return end
        if p != end:
            raise InvalidValueError(f"array contents at offset {p} do not end at its length")
        return end

    return array


# -- resumable walks (large bodies) ----------------------------------------------------


def _walk_gen(fns, b, p: int, d: int, f: int):
    """The resumable walk of consecutive values (checks ``fns``) from ``p``; returns where they end."""
    for fn in fns:
        if fn.gen is None:
            p = fn(b, p, d, f)
        else:
            p = yield from fn.gen(b, p, d, f)
    return p


def _top_gen(fns):
    """The resumable walk of a whole body (values ``fns``), from ``start``."""

    def top(b, start, f):
        p = yield from _walk_gen(fns, b, start, 0, f)
        if p != len(b):
            raise InvalidValueError(f"{len(b) - p} bytes left after the body")

    return top


def _struct_gen(head, members):
    """The resumable walk of a struct: ``head`` checks what precedes its members (the struct's
    ``.head``), ``members`` are the checks of its members."""

    def struct_gen(b, p, d, f):
        return (yield from _walk_gen(members, b, head(b, p, d, f), d, f))

    return struct_gen


def _array_gen(head, each, each_gen):
    """The resumable walk of an array: ``head`` checks what precedes the elements (see
    ``_array_check``), ``each`` is the
    one-shot check of an element, ``each_gen`` its resumable twin (None: ``each`` costs no more than
    its bytes in C, e.g. a string). Yields after every SLICE bytes of elements and at the end."""

    def array_gen(b, p, d, f):
        p, end = head(b, p, d, f)
        while p < end:
            cut = p + SLICE
            if cut >= len(b):  # what is left of the body is less than a step
                while p < end:
                    p = each(b, p, d, f)
                break
            start = p
            cb = b[:cut]
            try:
                while p < end:
                    p = each(cb, p, d, f)
            except TruncatedError:
                pass  # an element crosses the cut (p is where it starts): it is walked from the next step
            if p == start:  # ... unless it alone is larger than a step: then it is walked now, resumably
                if each_gen is None:
                    p = each(b, p, d, f)
                else:
                    p = yield from each_gen(b, p, d, f)
            yield
        if p != end:
            raise InvalidValueError(f"array contents at offset {p} do not end at its length")
        yield
        return end

    return array_gen


def _fixed_layout(types):
    """For a body of fixed-size values, optionally ending in one array of fixed-size elements other
    than ``b``/``h`` (``u``, ``(ii)``, ``ay``, ``tuay``...): everything is at a static offset.

    Returns (size, padding ranges, boolean offsets, fd index offsets, tail), offsets relative to
    the body; tail is None or (array length offset, element size) and then ``size`` is where the
    array's elements start. None if the signature has another shape.
    """
    pads, bools, fds = [], [], []
    pos = 0

    def align(a: int) -> None:
        nonlocal pos
        q = (pos + a - 1) & -a
        if q != pos:
            pads.append((pos, q))
            pos = q

    def lay(t: str) -> bool:
        nonlocal pos
        c = t[0]
        if c == "(":
            align(8)
            return all(lay(m) for m in struct_members(t))
        if c not in FIXED_SIZE:
            return False
        align(FIXED_SIZE[c])
        if c == "b":
            bools.append(pos)
        elif c == "h":
            fds.append(pos)
        pos += FIXED_SIZE[c]
        return True

    tail = None
    last = types[-1] if types else ""
    tail_elem = last[1] if last[:1] == "a" and last[1:] in FIXED_SIZE and last[1] not in "bh" else None
    if not all(lay(t) for t in (types[:-1] if tail_elem else types)):
        return None
    if tail_elem:
        align(4)
        len_at = pos
        pos += 4
        align(FIXED_SIZE[tail_elem])  # present even when the array is empty
        tail = (len_at, FIXED_SIZE[tail_elem])
    return pos, tuple(pads), tuple(bools), tuple(fds), tail


def _fixed_body_plan(layout, endian: str):  # noqa: C901
    size, pads, bools, fds, tail = layout
    u32 = _U32[endian]
    len_at, esize = tail or (0, 0)

    def fixed_body(b, start, f):  # noqa: C901
        have = len(b) - start
        if have < size:
            raise TruncatedError(f"body of {have} bytes, its signature needs at least {size}")
        want = size
        if tail is not None:
            n = u32(b, start + len_at)[0]
            if n > MAX_ARRAY_LENGTH:
                raise LimitExceededError(f"array of {n} bytes exceeds {MAX_ARRAY_LENGTH}")
            if n % esize:
                raise InvalidValueError(f"array of {n} bytes is not a multiple of its {esize}-byte elements")
            want += n
        if have != want:
            if have < want:
                raise TruncatedError(f"array of {want - size} bytes runs past the end of the body")
            raise InvalidValueError(f"{have - want} bytes left after the body")
        for p, q in pads:
            if b[start + p : start + q] != _ZEROS[q - p]:
                raise PaddingError(f"non-zero padding at body offset {p}")
        for p in bools:
            v = u32(b, start + p)[0]
            if v > 1:
                raise InvalidValueError(f"boolean value {v} at body offset {p} is neither 0 nor 1")
        for p in fds:
            v = u32(b, start + p)[0]
            if v >= f:
                raise FdIndexError(f"fd index {v} but the message carries {f} fds")

    if pads or bools or fds:
        return fixed_body
    if tail is None:

        def fixed_size(b, start, f):  # 'u', 'uu', 'ii', 'x', 't'...: the length says it all
            if len(b) - start != size:
                fixed_body(b, start, f)

        return fixed_size

    def fixed_then_array(b, start, f):  # 'ay', 'uay', 'tuay'...: the lengths say it all
        n = len(b) - start - size  # what the array must hold
        if n < 0 or n > MAX_ARRAY_LENGTH or n % esize or u32(b, start + len_at)[0] != n:
            fixed_body(b, start, f)  # says what is wrong

    return fixed_then_array
