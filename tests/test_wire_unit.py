"""Unit tests of the strict wire layer: each rule of the spec, and its corner cases."""

import struct

import pytest

from broker.wire import name_syntax as names
from broker.wire.errors import (
    FdIndexError,
    HeaderError,
    InvalidValueError,
    LimitExceededError,
    PaddingError,
    SignatureError,
    WireError,
)
from broker.wire.framer import Framer
from broker.wire.marshal import Variant, marshal, unmarshal
from broker.wire.message import HeaderView, WireCache, build_message, encode_header, message_size
from broker.wire.signature import split_signature

MAX_ARRAY_LENGTH = 64 * 1024 * 1024  # the D-Bus specification's limit, pinned (not the implementation's)

# -- signatures ------------------------------------------------------------------


@pytest.mark.parametrize("sig", ["", "y", "a{sv}", "(i(s(ay)))", "aa{s(ai)}", "v", "h" * 255, "a" * 32 + "y",
                                 "(" * 32 + "y" + ")" * 32, "a(" * 32 + "y" + ")" * 32])  # fmt: skip
def test_valid_signatures(sig):
    assert "".join(split_signature(sig)) == sig


INVALID = ["h" * 256, "a" * 33 + "y", "(" * 33 + "y" + ")" * 33, "()", "(y", "y)", "a",
           "{sv}", "a{vs}", "a{s}", "a{svy}", "z", "a{(y)s}", "a(" * 33 + "y" + ")" * 33]  # fmt: skip


@pytest.mark.parametrize("sig", INVALID)
def test_invalid_signatures(sig):
    with pytest.raises(SignatureError):
        split_signature(sig)


def test_total_nesting_limit_64():
    ok = "a" * 32 + "(" * 32 + "y" + ")" * 32
    assert split_signature(ok)
    with pytest.raises(SignatureError):
        split_signature("a" * 32 + "(" * 32 + "ay" + ")" * 32)


# -- values ------------------------------------------------------------------------

VALUES = [
    ("y", 255), ("b", True), ("n", -32768), ("q", 65535), ("i", -(2**31)), ("u", 2**32 - 1),
    ("x", -(2**63)), ("t", 2**64 - 1), ("d", 3.5), ("s", "h\u00e9llo"), ("o", "/a/b_c"), ("g", "a{sv}"),
    ("h", 0), ("ay", b"\x00\xff"), ("as", ["a", ""]), ("a{sv}", {"k": Variant("as", ["x"])}),
    ("(yv)", (1, Variant("v", Variant("i", 5)))), ("at", []), ("a(ty)", [(1, 2)]),
]  # fmt: skip


@pytest.mark.parametrize("endian", "lB")
@pytest.mark.parametrize(("sig", "value"), VALUES)
def test_round_trip(sig, value, endian):
    raw = marshal(sig, (value,), endian)
    assert unmarshal(sig, raw, endian, n_fds=1) == (value,)


def test_empty_array_of_8_aligned_still_pads():
    raw = marshal("yat", (1, []))
    # byte, 3 pad, u32 length 0, then padding to 8 even though the array is empty
    assert raw == b"\x01\0\0\0" + b"\0\0\0\0"
    raw = marshal("at", ([],))
    assert raw == b"\0\0\0\0" + b"\0\0\0\0"
    assert unmarshal("at", raw) == ([],)


def test_nonzero_padding_rejected():
    raw = bytearray(marshal("yu", (1, 2)))
    raw[1] = 1
    with pytest.raises(PaddingError):
        unmarshal("yu", bytes(raw))


def test_bad_utf8_and_nul_rejected():
    with pytest.raises(InvalidValueError):
        unmarshal("s", struct.pack("<I", 2) + b"\xff\xfe\0")
    with pytest.raises(InvalidValueError):
        unmarshal("s", struct.pack("<I", 3) + b"a\0b\0")
    with pytest.raises(InvalidValueError):
        unmarshal("s", struct.pack("<I", 1) + b"ab")  # not NUL-terminated


def test_bool_must_be_0_or_1():
    with pytest.raises(InvalidValueError):
        unmarshal("b", struct.pack("<I", 2))


def test_fd_index_out_of_range():
    with pytest.raises(FdIndexError):
        unmarshal("h", struct.pack("<I", 1), n_fds=1)


def test_array_length_limit():
    raw = struct.pack("<I", MAX_ARRAY_LENGTH + 1)
    with pytest.raises(LimitExceededError):
        unmarshal("ay", raw)


def test_nested_variants_depth_limit():
    v = Variant("i", 1)
    for _ in range(70):
        v = Variant("v", v)
    with pytest.raises(LimitExceededError):
        marshal("v", (v,))
    # build the bytes by hand: 70 nested variants
    raw = b"".join(b"\x01v\x00" for _ in range(70)) + b"\x01y\x00\x05"
    with pytest.raises(LimitExceededError):
        unmarshal("v", raw)


def test_invalid_object_path_rejected():
    for bad in ("", "a", "/a/", "//", "/a-b", "/a//b"):
        assert not names.is_object_path(bad)
        with pytest.raises(WireError):
            marshal("o", (bad,))


@pytest.mark.parametrize(("check", "good", "bad"), [
    (names.is_interface_name, ["a.b", "org.x_1.Y"], ["a", "a..b", "1a.b", "a.b-c", "a." + "b" * 255]),
    (names.is_member_name, ["Foo", "_x1"], ["", "1x", "a.b", "a-b"]),
    (names.is_bus_name, [":1.2", "org.x", "a-b.c", ":x.y-z"], ["org", ":1", ".a.b", "a..b", "1a.b", ""]),
    (names.is_error_name, ["org.x.Err"], ["Err"]),
])  # fmt: skip
def test_name_validation(check, good, bad):
    assert all(check(g) for g in good)
    assert not any(check(b) for b in bad)


# -- messages --------------------------------------------------------------------------


def call(**kw):
    fields = dict(path="/a", interface="org.x.I", member="M", destination="org.x.D")
    fields.update(kw.pop("fields", {}))
    return build_message(1, kw.pop("serial", 7), signature=kw.pop("signature", "s"),
                         body=kw.pop("body", ("hi",)), **fields)  # fmt: skip


@pytest.mark.parametrize("endian", "lB")
def test_header_view_and_forward(endian):
    raw = build_message(1, 9, path="/a", interface="org.x.I", member="M", destination="org.x.D",
                        signature="s", body=("x",), endian=endian)  # fmt: skip
    h = HeaderView(memoryview(raw))
    assert (h.path, h.interface, h.member, h.destination, h.serial, h.signature) == \
        ("/a", "org.x.I", "M", "org.x.D", 9, "s")  # fmt: skip
    assert isinstance(h.body, memoryview) and h.body.obj is raw  # a view, not a copy
    fwd = h.forward_header(":1.5")
    h2 = HeaderView(fwd + bytes(h.body))
    assert h2.sender == ":1.5" and h2.unmarshal_body() == ("x",)


@pytest.mark.parametrize("endian", "lB")
@pytest.mark.parametrize("first", [True, False])
def test_reply_serial_read_per_message_despite_header_cache(endian, first):
    """Replies share a cached field block; each one's own REPLY_SERIAL is still what it carries."""
    u32 = "<I" if endian == "l" else ">I"

    def reply(rs, dest=":1.7"):
        fields = dict(reply_serial=rs, destination=dest)
        if not first:  # REPLY_SERIAL after DESTINATION, as libdbus orders them
            hdr = encode_header(endian, 2, 0, 0, 5, destination=dest)
            flen = struct.unpack_from(u32, hdr, 12)[0]
            f = hdr[16 : 16 + flen]
            f += b"\0" * ((-len(f)) & 7) + b"\x05\x01u\x00" + struct.pack(u32, rs)
            raw = hdr[:12] + struct.pack(u32, len(f)) + f
            return raw + b"\0" * ((-len(raw)) & 7)
        return encode_header(endian, 2, 0, 0, 5, **fields)

    cache = WireCache()
    for rs in (11, 12, 0xFFFFFFFF, 13):
        h = HeaderView(memoryview(reply(rs)), cache=cache)
        assert (h.reply_serial, h.destination) == (rs, ":1.7")
    assert HeaderView(memoryview(reply(11, ":1.8")), cache=cache).destination == ":1.8"
    bad = bytearray(reply(14))
    at = bad.find(struct.pack(u32, 14), 16)
    bad[at : at + 4] = bytes(4)
    with pytest.raises(HeaderError):
        HeaderView(memoryview(bytes(bad)), cache=cache)


def test_block_without_reply_serial_is_never_keyed_by_another_blocks_offset():
    """A signal shape first seen with a REPLY_SERIAL must not make a same-length signal without one
    be cached with 4 of its bytes left out: a message differing only there would get its fields."""
    cache = WireCache()
    fields = dict(path="/a", interface="org.x.I", member="M")
    with_rs = encode_header("l", 4, 0, 0, 1, **fields, reply_serial=7)
    assert HeaderView(memoryview(with_rs), cache=cache).reply_serial == 7
    (rs,) = cache.reply_serial_at.values()
    # same field array length, UNIX_FDS where the other block had its REPLY_SERIAL value
    one_fd = encode_header("l", 4, 0, 0, 2, **fields, unix_fds=1)
    assert struct.unpack_from("<I", one_fd, 12) == struct.unpack_from("<I", with_rs, 12)
    assert struct.unpack_from("<I", one_fd, rs) == (1,)
    assert HeaderView(memoryview(one_fd), cache=cache).unix_fds == 1
    three_fds = encode_header("l", 4, 0, 0, 3, **fields, unix_fds=3)
    h = HeaderView(memoryview(three_fds), cache=cache)
    assert (h.unix_fds, h.reply_serial) == (3, 0)
    assert HeaderView(h.forward_header(":1.9")).unix_fds == 3


def test_forwarded_header_per_sender_with_a_shared_field_block():
    """Calls with the same field block share a cached forwarded header per sender; each message
    still goes out with its own serial and body, and each sender's own name."""
    from broker.wire.message import _FORWARD_SENDERS_MAX

    seen = []
    cache = WireCache()
    for i in range(3 * _FORWARD_SENDERS_MAX):
        sender = f":1.{i % (_FORWARD_SENDERS_MAX + 3)}"
        raw = build_message(1, 100 + i, path="/a", interface="org.x.I", member="M", destination="org.x.D",
                            signature="s", body=(f"v{i}",))  # fmt: skip
        h = HeaderView(memoryview(raw), cache=cache)
        bufs = h.forward(sender)
        assert isinstance(bufs[-1], memoryview) and bufs[-1].obj is raw  # the body is not copied
        out = HeaderView(b"".join(bufs))
        seen.append((out.sender, out.serial, out.unmarshal_body()))
    assert seen == [(f":1.{i % (_FORWARD_SENDERS_MAX + 3)}", 100 + i, (f"v{i}",)) for i in range(len(seen))]


def test_spoofed_sender_replaced_and_unknown_fields_stripped():
    # an unknown header field (code 100, a string) and a spoofed SENDER
    hdr = encode_header("l", 4, 0, 0, 3, path="/a", interface="org.x.I", member="S", sender=":1.999")
    fields_len = struct.unpack_from("<I", hdr, 12)[0]
    extra = b"\x64\x01s\x00" + struct.pack("<I", 3) + b"abc\0"
    body_start = 16 + fields_len
    pad = (-body_start) & 7
    new_fields = hdr[16:body_start] + b"\0" * pad + extra
    raw = hdr[:12] + struct.pack("<I", len(new_fields)) + new_fields
    raw += b"\0" * ((-len(raw)) & 7)
    h = HeaderView(memoryview(raw))
    assert h.unknown_fields == 1 and h.sender == ":1.999"
    h2 = HeaderView(h.forward_header(":1.5"))
    assert h2.sender == ":1.5" and h2.unknown_fields == 0


@pytest.mark.parametrize(("msg_type", "fields"), [
    (1, dict(member="M")),  # call without PATH
    (1, dict(path="/a")),  # call without MEMBER
    (4, dict(path="/a", member="M")),  # signal without INTERFACE
    (3, dict(reply_serial=1)),  # error without ERROR_NAME
    (2, dict()),  # return without REPLY_SERIAL
])  # fmt: skip
def test_required_fields(msg_type, fields):
    raw = encode_header("l", msg_type, 0, 0, 1, **fields)
    with pytest.raises(HeaderError):
        HeaderView(memoryview(raw))


def test_body_without_signature_rejected():
    raw = encode_header("l", 1, 0, 4, 1, path="/a", member="M") + b"\0\0\0\0"
    with pytest.raises(HeaderError):
        HeaderView(memoryview(raw))


def test_duplicate_field_rejected():
    hdr = encode_header("l", 1, 0, 0, 1, path="/a", member="M")
    fields_len = struct.unpack_from("<I", hdr, 12)[0]
    dup = b"\x03\x01s\x00" + struct.pack("<I", 1) + b"N\0"
    f = hdr[16 : 16 + fields_len]
    f += b"\0" * ((-len(f)) & 7) + dup
    raw = hdr[:12] + struct.pack("<I", len(f)) + f
    raw += b"\0" * ((-len(raw)) & 7)
    with pytest.raises(HeaderError):
        HeaderView(memoryview(raw))


def test_local_interface_reserved():
    raw = build_message(4, 1, path="/org/freedesktop/DBus/Local", interface="org.x.I", member="M")
    with pytest.raises(HeaderError):
        HeaderView(memoryview(raw))


def test_truncated_at_every_offset():
    raw = call()
    for n in range(len(raw)):
        with pytest.raises(WireError):
            HeaderView(memoryview(raw[:n]))


def test_message_size_checked_from_fixed_header():
    raw = bytearray(call())
    struct.pack_into("<I", raw, 4, 200 * 1024 * 1024)  # body length beyond 128 MiB
    with pytest.raises(LimitExceededError):
        message_size(raw[:16])
    f = Framer(max_message_size=1024)
    big = build_message(1, 1, path="/", member="M", signature="ay", body=(b"x" * 2000,))
    with pytest.raises(LimitExceededError):
        f.feed(big[:16])  # rejected from 16 bytes, before the body is buffered


# -- framer ------------------------------------------------------------------------------


def test_framer_any_chunking():
    msgs = [call(serial=i + 1, body=("x" * i,)) for i in range(20)]
    stream = b"".join(msgs)
    for chunk in (1, 3, 16, 17, 1000, len(stream)):
        f = Framer()
        got = []
        for i in range(0, len(stream), chunk):
            got += f.feed(stream[i : i + chunk])
        assert [m.header.serial for m in got] == list(range(1, 21))
        assert [m.header.unmarshal_body() for m in got] == [("x" * i,) for i in range(20)]


def test_framer_attaches_fds():
    a = build_message(1, 1, path="/", member="M", signature="h", body=(0,), unix_fds=1)
    b = call(serial=2)
    c = build_message(1, 3, path="/", member="M", signature="hh", body=(0, 1), unix_fds=2)
    f = Framer()
    got = f.feed(a + b + c, fds=[10, 11, 12])
    assert [m.fds for m in got] == [[10], [], [11, 12]]


def test_framer_too_few_fds():
    a = build_message(1, 1, path="/", member="M", signature="h", body=(0,), unix_fds=1)
    with pytest.raises(HeaderError):
        Framer().feed(a)


def test_framer_large_message_buffer():
    big = build_message(1, 1, path="/", member="M", signature="ay", body=(b"y" * 300000,))
    f = Framer()
    out = []
    for i in range(0, len(big), 65536):
        out += f.feed(big[i : i + 65536])
    assert len(out) == 1 and len(out[0].header.unmarshal_body()[0]) == 300000
