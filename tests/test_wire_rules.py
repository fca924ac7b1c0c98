"""More wire rules: header-field validation, framer properties, limits, SASL states."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.wire.errors import (
    HeaderError,
    InvalidValueError,
    LimitExceededError,
    PaddingError,
    SaslError,
    TruncatedError,
    WireError,
)
from broker.wire.framer import Framer
from broker.wire.marshal import marshal, unmarshal
from broker.wire.message import HeaderView, build_message, encode_header, message_size
from broker.wire.sasl import SaslServer

GUID = "0123456789abcdef0123456789abcdef"


def with_field(code: int, sig: str, value_bytes: bytes, **base) -> bytes:
    """A header (no body) of a method call plus one hand-encoded field appended."""
    base = base or dict(path="/a", member="M")
    hdr = encode_header("l", 1, 0, 0, 1, **base)
    fields_len = struct.unpack_from("<I", hdr, 12)[0]
    f = hdr[16 : 16 + fields_len]
    f += b"\0" * ((-(16 + len(f))) & 7) + bytes([code, len(sig)]) + sig.encode() + b"\0" + value_bytes
    raw = hdr[:12] + struct.pack("<I", len(f)) + f
    return raw + b"\0" * ((-len(raw)) & 7)


def sfield(s: bytes) -> bytes:
    return struct.pack("<I", len(s)) + s + b"\0"


@pytest.mark.parametrize(("code", "sig", "value"), [
    (1, "o", sfield(b"/a/")),  # PATH trailing slash (also a duplicate, either way an error)
    (2, "s", sfield(b"org..x")),  # INTERFACE empty element
    (2, "s", sfield(b"noDots")),  # INTERFACE single element
    (6, "s", sfield(b":1.")),  # unique name with empty element
    (6, "s", sfield(b"1org.x")),  # well-known element starting with a digit
    (4, "s", sfield(b"NoDot")),  # ERROR_NAME single element
    (2, "s", sfield(b"org.x\0.I")),  # embedded NUL
    (2, "s", sfield(b"org.\xff.I")),  # bad UTF-8
    (6, "u", struct.pack("<I", 1)),  # DESTINATION with the wrong type
    (5, "s", sfield(b"1")),  # REPLY_SERIAL with the wrong type
    (8, "s", sfield(b"z")),  # SIGNATURE: wrong type and invalid
    (8, "g", b"\x01z\0"),  # SIGNATURE with an invalid type code
])  # fmt: skip
def test_bad_header_fields_rejected(code, sig, value):
    raw = with_field(code, sig, value)
    with pytest.raises(WireError):
        HeaderView(memoryview(raw))


def test_good_destination_field_accepted():
    raw = with_field(6, "s", sfield(b"org.x-y.Z"))  # '-' is legal in bus names
    assert HeaderView(memoryview(raw)).destination == "org.x-y.Z"


@pytest.mark.parametrize("member", ["", "1M", "a.b", "M-x", "x" * 256])
def test_bad_member_rejected(member):
    m = member.encode()
    raw = with_field(3, "s", sfield(m), path="/a")
    with pytest.raises(WireError):
        HeaderView(memoryview(raw))


def test_unknown_field_of_any_type_is_skipped_and_stripped():
    # code, "at", 3 pad bytes, length 0, 4 pad bytes: an empty array of an 8-aligned type still pads
    raw = with_field(200, "at", b"\0" * 3 + struct.pack("<I", 0) + b"\0" * 4)
    h = HeaderView(memoryview(raw))
    assert h.unknown_fields == 1
    assert HeaderView(h.forward_header(":1.2")).unknown_fields == 0


@pytest.mark.parametrize(("offset", "value", "exc"), [
    (0, ord("x"), HeaderError),  # endianness byte
    (1, 0, HeaderError),  # message type 0 (INVALID)
    (1, 5, HeaderError),
    (3, 2, HeaderError),  # protocol version
])  # fmt: skip
def test_fixed_header_bytes(offset, value, exc):
    raw = bytearray(build_message(1, 1, path="/a", member="M"))
    raw[offset] = value
    with pytest.raises(exc):
        HeaderView(memoryview(raw))


def test_zero_serial_rejected():
    raw = bytearray(build_message(1, 1, path="/a", member="M"))
    struct.pack_into("<I", raw, 8, 0)
    with pytest.raises(HeaderError):
        HeaderView(memoryview(raw))


def test_nonzero_padding_after_header_fields():
    raw = bytearray(build_message(1, 1, path="/a", member="M", signature="y", body=(1,)))
    fields_len = struct.unpack_from("<I", raw, 12)[0]
    end = 16 + fields_len
    assert end % 8, "test needs padding after the fields"
    raw[end] = 1
    with pytest.raises(HeaderError):
        HeaderView(memoryview(raw))


def test_body_shorter_than_signature():
    raw = bytearray(build_message(1, 1, path="/a", member="M", signature="u", body=(7,)))
    h = HeaderView(memoryview(raw))
    assert h.unmarshal_body() == (7,)
    # announce 'uu' in a fresh message with a 4-byte body
    hdr = encode_header("l", 1, 0, 4, 1, path="/a", member="M", signature="uu")
    with pytest.raises(WireError):
        HeaderView(memoryview(hdr + b"\1\0\0\0")).unmarshal_body()


def test_trailing_body_bytes_rejected():
    hdr = encode_header("l", 1, 0, 8, 1, path="/a", member="M", signature="u")
    with pytest.raises(WireError):
        HeaderView(memoryview(hdr + b"\1\0\0\0\0\0\0\0")).unmarshal_body()


# -- values: more corner cases ------------------------------------------------------


def test_array_elements_overrun_declared_length():
    # ai with length 6: the second int straddles the array end
    with pytest.raises(WireError):
        unmarshal("ai", struct.pack("<I", 6) + struct.pack("<ii", 1, 2))


def test_array_length_not_checked_by_allocation():
    # 64 MiB declared, 4 bytes present: truncated, answered without allocating
    with pytest.raises(TruncatedError):
        unmarshal("ay", struct.pack("<I", 64 * 1024 * 1024) + b"abcd")


def test_padding_in_struct_and_dict_entry_must_be_zero():
    good = marshal("(yt)", ((1, 2),))
    bad = bytearray(good)
    bad[3] = 9
    with pytest.raises(PaddingError):
        unmarshal("(yt)", bytes(bad))
    good = marshal("a{yt}", ({1: 2},))
    bad = bytearray(good)
    bad[4] = 1  # padding between length and first 8-aligned entry
    with pytest.raises(PaddingError):
        unmarshal("a{yt}", bytes(bad))


def test_string_nul_terminator_required():
    with pytest.raises(InvalidValueError):
        unmarshal("s", struct.pack("<I", 1) + b"ax")


@pytest.mark.parametrize(("sig", "payload"), [
    ("o", b"a/b"), ("o", b"/a/"), ("g", b"(y"), ("g", b"z"), ("s", b"\xc0\x80"), ("s", b"\xed\xa0\x80"),
])  # fmt: skip
def test_bad_typed_strings(sig, payload):
    raw = (bytes([len(payload)]) if sig == "g" else struct.pack("<I", len(payload))) + payload + b"\0"
    with pytest.raises(WireError):
        unmarshal(sig, raw)


def test_variant_signature_must_be_single_complete_type():
    for inner in (b"ii", b"", b"a"):
        raw = bytes([len(inner)]) + inner + b"\0" + b"\0" * 8
        with pytest.raises(WireError):
            unmarshal("v", raw)


def test_marshal_rejects_bad_python_values():
    for sig, value in (("y", 256), ("i", 2**31), ("u", -1), ("s", "a\0b"), ("o", "bad"), ("b", 2)):
        with pytest.raises((WireError, TypeError, ValueError)):
            marshal(sig, (value,))


# -- size limits ----------------------------------------------------------------------


def test_128_mib_limit_from_fixed_header_only():
    limit = 128 * 1024 * 1024
    hdr = bytearray(encode_header("l", 1, 0, 0, 1, path="/a", member="M", signature="ay"))
    header_len = len(hdr)
    struct.pack_into("<I", hdr, 4, limit - header_len)
    assert message_size(hdr[:16]) == limit
    struct.pack_into("<I", hdr, 4, limit - header_len + 1)
    with pytest.raises(LimitExceededError):
        message_size(hdr[:16])


def test_configurable_lower_limit_rejects_before_body():
    f = Framer(max_message_size=4096)
    big = build_message(1, 1, path="/", member="M", signature="ay", body=(b"x" * 5000,))
    f.feed(big[:15])  # not yet 16 bytes: nothing decided
    with pytest.raises(LimitExceededError):
        f.feed(big[15:16])
    assert f.buffered <= 16
    ok = build_message(1, 1, path="/", member="M", signature="ay", body=(b"x" * 1000,))
    assert len(Framer(max_message_size=4096).feed(ok)) == 1


def test_header_view_respects_lower_limit():
    raw = build_message(1, 1, path="/", member="M", signature="ay", body=(b"x" * 100,))
    with pytest.raises(LimitExceededError):
        HeaderView(memoryview(raw), max_size=64)


# -- framer properties -----------------------------------------------------------------

MSGS = [
    build_message(1, 1, path="/a", member="M", destination=":1.1", signature="h", body=(0,), unix_fds=1),
    build_message(4, 2, path="/s", interface="org.x.I", member="S", signature="s", body=("x" * 50,), endian="B"),
    build_message(1, 3, path="/a", member="N", signature="hh", body=(0, 1), unix_fds=2),
    build_message(2, 4, reply_serial=1, destination=":1.3"),
    build_message(3, 5, error_name="org.x.E", reply_serial=2, signature="s", body=("e",)),
]  # fmt: skip
STREAM = b"".join(MSGS)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, len(STREAM)), max_size=40), st.integers(0, len(MSGS)))
def test_framer_any_split_points_same_messages_and_fds(cuts, fd_at):
    """Fds arrive with some chunk no later than their message; they attach in order."""
    points = sorted(set(c for c in cuts if c < len(STREAM)))
    chunks = [STREAM[a:b] for a, b in zip([0, *points], [*points, len(STREAM)], strict=True)]
    f = Framer()
    got = []
    for i, c in enumerate(chunks):
        fds = [100, 101, 102] if i == 0 else []
        got += f.feed(c, fds=fds)
    assert [bytes(m.header.raw) for m in got] == MSGS
    assert [m.fds for m in got] == [[100], [], [101, 102], [], []]
    assert f.close() == []


def test_framer_body_is_view_of_its_buffer():
    f = Framer()
    [m] = f.feed(MSGS[1])
    assert isinstance(m.header.body, memoryview)
    assert isinstance(m.header.body.obj, bytearray)  # the framer's receive buffer, not a copy
    assert bytes(m.header.body) == bytes(MSGS[1][m.header.header_len :])


def test_framer_fd_limit_per_message():
    msg = build_message(1, 1, path="/", member="M", signature="hhh", body=(0, 1, 2), unix_fds=3)
    with pytest.raises(LimitExceededError):
        Framer(max_fds_per_message=2).feed(msg, fds=[1, 2, 3])


def test_framer_close_returns_unattached_fds():
    f = Framer()
    f.feed(MSGS[3], fds=[7, 8])
    assert f.close() == [7, 8]


def test_framer_truncated_stream_yields_nothing():
    for n in range(len(MSGS[1])):
        f = Framer()
        assert f.feed(MSGS[1][:n]) == []


def test_framer_recv_buffer_commit_path():
    f = Framer()
    data = memoryview(STREAM)
    got = []
    while data:
        buf = f.recv_buffer()
        n = min(len(buf), len(data), 7)
        buf[:n] = data[:n]
        data = data[n:]
        f.commit(n, [5, 6, 7] if not got and n else [])
        got += list(f.messages())
    assert len(got) == len(MSGS)


# -- SASL states --------------------------------------------------------------------------


def test_negotiate_unix_fd_agreed_and_unix_fd_default_off():
    s = SaslServer(0, GUID)
    assert s.feed(b"\0AUTH EXTERNAL 30\r\n") == f"OK {GUID}\r\n".encode()
    assert not s.unix_fd
    assert s.feed(b"NEGOTIATE_UNIX_FD\r\n") == b"AGREE_UNIX_FD\r\n"
    assert s.feed(b"BEGIN\r\n") == b"" and s.done and s.unix_fd and s.leftover == b""


def test_negotiate_before_auth_is_error_not_agree():
    s = SaslServer(0, GUID)
    assert s.feed(b"\0NEGOTIATE_UNIX_FD\r\n").startswith(b"ERROR")
    assert not s.unix_fd


def test_byte_at_a_time_with_leftover():
    s = SaslServer(1000, GUID)
    data = b"\0AUTH EXTERNAL " + b"1000".hex().encode() + b"\r\nBEGIN\r\nl\1\0\1rest"
    out = b""
    for i in range(len(data)):
        if s.done:
            break
        out += s.feed(data[i : i + 1])
    assert out == f"OK {GUID}\r\n".encode() and s.done
    assert s.leftover == b""  # fed one byte at a time: nothing came after BEGIN's CRLF
    s2 = SaslServer(1000, GUID)
    s2.feed(data[:5])
    s2.feed(data[5:])
    assert s2.done and s2.leftover == b"l\1\0\1rest"


@pytest.mark.parametrize("resp", [b"zz", b"3", b"-1".hex().encode(), b" 0".hex().encode(),
                                  "٣".encode().hex().encode()])  # fmt: skip
def test_malformed_or_foreign_external_rejected(resp):
    s = SaslServer(3, GUID)
    assert s.feed(b"\0AUTH EXTERNAL " + resp + b"\r\n") == b"REJECTED EXTERNAL\r\n"


def test_data_in_wrong_state_is_error():
    s = SaslServer(0, GUID)
    assert s.feed(b"\0DATA 30\r\n").startswith(b"ERROR")
    assert not s.done


def test_feed_after_done_is_error():
    s = SaslServer(0, GUID)
    s.feed(b"\0AUTH EXTERNAL 30\r\nBEGIN\r\n")
    with pytest.raises(SaslError):
        s.feed(b"AUTH\r\n")


def test_cancel_then_retry_succeeds():
    s = SaslServer(0, GUID)
    s.feed(b"\0AUTH EXTERNAL\r\n")
    assert s.feed(b"CANCEL\r\n") == b"REJECTED EXTERNAL\r\n"
    assert s.feed(b"AUTH EXTERNAL 30\r\nBEGIN\r\n") == f"OK {GUID}\r\n".encode() and s.done
