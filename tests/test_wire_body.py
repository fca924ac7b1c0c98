"""Body validation (broker/wire/body_check.py): every body is walked against its signature before
routing. One test per invalid case of the hardening issue, both byte orders where it matters,
and property tests: what our marshaller writes is accepted, mutations never crash and are
judged as the strict unmarshaller judges them."""

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.wire.body_check import MAX_PLAN_CODES, MAX_PLANS, BodyChecker
from broker.wire.errors import (
    FdIndexError,
    InvalidNameError,
    InvalidValueError,
    LimitExceededError,
    PaddingError,
    SignatureError,
    TruncatedError,
    WireError,
)
from broker.wire.framer import Framer
from broker.wire.marshal import marshal, unmarshal
from broker.wire.message import build_message, encode_header

from .test_wire_props import sig_and_values

U32 = {"l": "<I", "B": ">I"}


def message(signature: str, body: bytes, endian: str = "l", unix_fds: int = 0) -> bytes:
    """A valid method-call header announcing ``signature`` and carrying ``body`` as given."""
    hdr = encode_header(endian, 1, 0, len(body), 7, path="/a", interface="org.x.I", member="M",
                        destination="org.x.Y", signature=signature, unix_fds=unix_fds)  # fmt: skip
    return hdr + body


def framed(raw: bytes, fds=()):
    return Framer().feed(raw, fds=list(fds))


def u32(endian: str, v: int) -> bytes:
    return struct.pack(U32[endian], v)


def rejects(signature: str, body: bytes, endian: str, error=WireError, unix_fds: int = 0, fds=()):
    with pytest.raises(error):
        framed(message(signature, body, endian, unix_fds), fds)


# -- the cases of the issue --------------------------------------------------------


@pytest.mark.parametrize("endian", "lB")
def test_invalid_utf8_in_string_rejected(endian):
    for bad in (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"ab\xe2\x82"):
        rejects("s", u32(endian, len(bad)) + bad + b"\0", endian, InvalidValueError)
    ok = "h\u00e9llo \U0001f600".encode()
    assert framed(message("s", u32(endian, len(ok)) + ok + b"\0", endian))


@pytest.mark.parametrize("endian", "lB")
def test_string_without_its_nul_rejected(endian):
    rejects("su", u32(endian, 2) + b"abX" + b"\0" + u32(endian, 1), endian, InvalidValueError)
    rejects("s", u32(endian, 2) + b"ab", endian, TruncatedError)  # the body ends where the NUL should be


@pytest.mark.parametrize("endian", "lB")
def test_string_with_interior_nul_rejected(endian):
    rejects("s", u32(endian, 3) + b"a\0b\0", endian, InvalidValueError)


@pytest.mark.parametrize("endian", "lB")
def test_length_past_the_end_rejected(endian):
    rejects("s", u32(endian, 100) + b"abc\0", endian, TruncatedError)
    rejects("ay", u32(endian, 100) + b"abc\0", endian, TruncatedError)
    rejects("as", u32(endian, 12) + u32(endian, 1) + b"a\0", endian, TruncatedError)
    rejects("g", b"\x09ai\0", endian, TruncatedError)


@pytest.mark.parametrize("endian", "lB")
def test_boolean_of_2_rejected(endian):
    rejects("b", u32(endian, 2), endian, InvalidValueError)
    rejects("yb", b"\1\0\0\0" + u32(endian, 0x100), endian, InvalidValueError)
    rejects("ab", u32(endian, 8) + u32(endian, 1) + u32(endian, 2), endian, InvalidValueError)
    rejects("a{bs}", u32(endian, 9) + bytes(4) + u32(endian, 7) + u32(endian, 0) + b"\0", endian,
            InvalidValueError)  # fmt: skip
    assert framed(message("bb", u32(endian, 1) + u32(endian, 0), endian))


@pytest.mark.parametrize("endian", "lB")
def test_array_over_64_mib_rejected_from_its_length(endian):
    rejects("ay", u32(endian, 64 * 1024 * 1024 + 1) + b"abcd", endian, LimitExceededError)
    rejects("as", u32(endian, 0xFFFFFFFF), endian, LimitExceededError)


def test_array_over_64_mib_rejected_even_when_all_there():
    n = 64 * 1024 * 1024 + 8
    for sig, head in (("ay", b""), ("tuay", bytes(12))):
        body = bytearray(len(head) + 4 + n)
        struct.pack_into("<I", body, len(head), n)
        with pytest.raises(LimitExceededError):
            BodyChecker().check_body(sig, body)
        del body


@pytest.mark.parametrize("endian", "lB")
def test_fixed_values_then_a_byte_array(endian):
    c = BodyChecker()
    ok = b"\1" + bytes(3) + u32(endian, 3) + b"abc"
    c.check_body("yay", ok, endian)
    for bad in (b"\1\0\1\0" + ok[4:], ok + b"\0", ok[:-1], b"\1" + bytes(3) + u32(endian, 4) + b"abc"):
        with pytest.raises(WireError):
            c.check_body("yay", bad, endian)
    c.check_body("tuat", bytes(12) + u32(endian, 8) + bytes(8), endian)  # no padding: 16 is 8-aligned
    with pytest.raises(PaddingError):
        c.check_body("yuat", b"\1\0\0\0" + u32(endian, 5) + u32(endian, 0) + b"\0\0\0\1", endian)


@pytest.mark.parametrize("endian", "lB")
def test_100_nested_variants_rejected(endian):
    body = b"\1v\0" * 100 + b"\1y\0\x2a"
    rejects("v", body, endian, LimitExceededError)
    # libdbus's rule: a variant's value is one level deeper, 64 levels are allowed
    assert framed(message("v", b"\1v\0" * 63 + b"\1y\0\x2a", endian))
    rejects("v", b"\1v\0" * 64 + b"\1y\0\x2a", endian, LimitExceededError)


def nested_arrays(k: int, out: bytearray, endian: str = "l") -> bytearray:
    """Append one value of type ``a(`` * k ``y`` ``)`` * k, one element per array (our marshaller
    refuses values this deep, so the bytes are laid out here)."""
    out += bytes((-len(out)) & 3)
    at = len(out)
    out += bytes(4)
    out += bytes((-len(out)) & 7)
    start = len(out)
    if k == 1:
        out.append(1)
    else:
        nested_arrays(k - 1, out, endian)
    struct.pack_into(U32[endian], out, at, len(out) - start)
    return out


def test_depth_counts_arrays_structs_and_variants_together():
    sig = "a(" * 31 + "y" + ")" * 31  # its innermost byte is at depth 62
    assert BodyChecker().check_body(sig, bytes(nested_arrays(31, bytearray()))) is None
    # a variant wrapping it puts that byte at 1 + 62 = 63: still fine
    body = nested_arrays(31, bytearray(bytes([len(sig)]) + sig.encode() + b"\0"))
    assert BodyChecker().check_body("v", bytes(body)) is None
    # two nested variants in a struct in an array push it to 2 + 2 + 62 = 66 > 64
    prefix = bytearray(bytes(8) + b"\1v\0" + bytes([len(sig)]) + sig.encode() + b"\0")
    body = nested_arrays(31, bytearray(prefix))
    struct.pack_into("<I", body, 0, len(body) - 8)
    with pytest.raises(LimitExceededError):
        BodyChecker().check_body("a(v)", bytes(body))
    # the same types with the outermost array empty never get that deep (libdbus counts values, not types)
    body = bytearray(prefix) + bytes((-len(prefix)) & 3) + bytes(4)
    struct.pack_into("<I", body, 0, len(body) - 8)
    assert BodyChecker().check_body("a(v)", bytes(body)) is None


@pytest.mark.parametrize("endian", "lB")
def test_fd_index_at_or_past_unix_fds_rejected(endian):
    rejects("h", u32(endian, 0), endian, FdIndexError)  # no UNIX_FDS field: no index is valid
    rejects("h", u32(endian, 1), endian, FdIndexError, unix_fds=1, fds=[-1])
    rejects("ah", u32(endian, 8) + u32(endian, 0) + u32(endian, 2), endian, FdIndexError, unix_fds=2, fds=[-1, -1])
    rejects("(yh)", b"\1\0\0\0" + u32(endian, 5), endian, FdIndexError, unix_fds=2, fds=[-1, -1])
    (m,) = framed(message("hh", u32(endian, 1) + u32(endian, 0), endian, unix_fds=2), fds=[-1, -2])
    assert m.fds == [-1, -2]


def test_fds_of_a_rejected_body_stay_with_the_framer():
    f = Framer()
    with pytest.raises(FdIndexError):
        f.feed(message("h", u32("l", 3), "l", unix_fds=1), fds=[-7])
    assert f.close() == [-7]  # the connection closes them


@pytest.mark.parametrize("endian", "lB")
@pytest.mark.parametrize("path", [b"", b"a", b"/a/", b"//", b"/a//b", b"/a-b", b"/\xc3\xa9", b"/a.b"])
def test_bad_object_path_rejected(endian, path):
    rejects("o", u32(endian, len(path)) + path + b"\0", endian, InvalidNameError)


@pytest.mark.parametrize("sig", [b"z", b"a", b"(", b"()", b"{sv}", b"a{vs}", b"a" * 33 + b"y", b"\xc3\xa9"])
def test_bad_signature_value_rejected(sig):
    rejects("g", bytes([len(sig)]) + sig + b"\0", "l", SignatureError)
    rejects("v", bytes([len(sig)]) + sig + b"\0" + bytes(8), "l", SignatureError)


def test_variant_signature_must_be_one_single_complete_type():
    rejects("v", b"\0\0", "l", SignatureError)  # empty
    rejects("v", b"\2yy\0\1\2", "l", SignatureError)  # two types
    rejects("v", b"\x04{sv}\0" + bytes(16), "l", SignatureError)  # dict entry outside an array
    assert framed(message("g", b"\2yy\0", "l"))  # fine as a signature value


# -- the other rules of a valid body -----------------------------------------------


@pytest.mark.parametrize("endian", "lB")
def test_nonzero_padding_rejected_everywhere(endian):
    rejects("yu", b"\1\0\1\0" + u32(endian, 5), endian, PaddingError)
    rejects("yt", b"\1" + b"\0" * 6 + b"\1" + bytes(8), endian, PaddingError)
    rejects("y(y)", b"\1\0\0\0\0\0\0\1\2", endian, PaddingError)
    rejects("ys", b"\1\0\1\0" + u32(endian, 0) + b"\0", endian, PaddingError)
    rejects("yv", b"\1\1t\0" + b"\0\1\0\0" + bytes(8), endian, PaddingError)  # before the variant's value


@pytest.mark.parametrize("endian", "lB")
def test_empty_array_still_pads_to_its_element_alignment(endian):
    assert framed(message("at", u32(endian, 0) + bytes(4), endian))
    rejects("at", u32(endian, 0) + b"\0\0\1\0", endian, PaddingError)
    rejects("at", u32(endian, 0), endian, TruncatedError)  # padding missing
    rejects("a{sv}", u32(endian, 0) + b"\0\0\0\7", endian, PaddingError)


@pytest.mark.parametrize("endian", "lB")
def test_array_must_end_on_an_element_boundary(endian):
    rejects("ai", u32(endian, 5) + bytes(8), endian, InvalidValueError)
    rejects("at", u32(endian, 12) + bytes(4) + bytes(16), endian, InvalidValueError)
    # a 5-byte array of strings: its one string "a" (4 + 1 + NUL = 6 bytes) runs past it
    rejects("asy", u32(endian, 5) + u32(endian, 1) + b"a\0" + b"\1", endian, InvalidValueError)


def test_dict_entry_only_as_array_element():
    with pytest.raises(SignatureError):
        framed(message("{sv}", bytes(16), "l"))
    with pytest.raises(SignatureError):
        BodyChecker().check_body("{yy}", b"\1\2")


@pytest.mark.parametrize("endian", "lB")
def test_body_consumed_exactly(endian):
    rejects("u", u32(endian, 1) + b"\0", endian, InvalidValueError)  # fixed layout
    rejects("s", u32(endian, 1) + b"a\0" + b"\0", endian, InvalidValueError)
    rejects("u", b"\0\0", endian, TruncatedError)
    rejects("uu", u32(endian, 1), endian, TruncatedError)
    rejects("y", b"", endian, TruncatedError)


def test_plan_cache_is_bounded():
    c = BodyChecker()
    for i in range(3 * MAX_PLANS):
        sig = "(" + "y" * (1 + i % 40) + "u" * (i // 40) + ")"
        c.check_body(sig, marshal(sig, (tuple([1] * (1 + i % 40) + [2] * (i // 40)),)))
    assert len(c.plans) <= MAX_PLANS
    for i in range(3 * MAX_PLANS):  # long signatures: the bound on their total length holds first
        sig = "(" + "y" * 190 + "u" * (1 + i % 50) + "t" * (i // 50) + ")"
        body = marshal(sig, (tuple([1] * 190 + [2] * (1 + i % 50) + [3] * (i // 50)),))
        c.check_body(sig, body)
        assert sum(len(k) for k in c.plans) <= MAX_PLAN_CODES


def test_big_endian_plan_never_used_for_little_endian():
    c = BodyChecker()
    c.check_body("b", u32("B", 1), "B")
    with pytest.raises(InvalidValueError):
        c.check_body("b", u32("B", 1), "l")  # 0x01000000 little-endian


# -- properties ----------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sig_and_values(), st.sampled_from("lB"))
def test_everything_our_marshaller_writes_is_accepted(sv, endian):
    sig, values = sv
    raw = build_message(1, 3, path="/a", member="M", signature=sig, body=values, endian=endian)
    (m,) = Framer().feed(raw)
    assert m.header.signature == sig


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sig_and_values(), st.sampled_from("lB"), st.data())
def test_single_byte_mutations_never_crash_and_match_the_unmarshaller(sv, endian, data):
    sig, values = sv
    body = bytearray(marshal(sig, values, endian))
    if body:
        i = data.draw(st.integers(0, len(body) - 1))
        body[i] = data.draw(st.sampled_from([0, 1, 2, 0x7F, 0x80, 0xFF, body[i] ^ 0x01, body[i] ^ 0x80]))
    try:
        BodyChecker().check_body(sig, bytes(body), endian)
        ok = True
    except WireError:
        ok = False
    try:
        unmarshal(sig, bytes(body), endian)
        ref = True
    except WireError:
        ref = False
    assert ok == ref
    # the same through the framer, as the broker does it
    try:
        Framer().feed(message(sig, bytes(body), endian))
        assert ok
    except WireError:
        assert not ok
