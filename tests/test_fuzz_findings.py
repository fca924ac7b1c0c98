"""What the fuzz targets found, each as a test of the fixed behaviour (the inputs are in
tests/fuzz_corpus/<target>/crash-* too)."""

import socket

import pytest

from broker.access.config import ConfigError, parse_config_string
from broker.bus.match import MatchRuleInvalid, parse_match_rule
from broker.io.control import Inbox, encode
from broker.wire.errors import SaslError
from broker.wire.framer import Framer
from broker.wire.message import encode_header
from broker.wire.sasl import MAX_LINE, SaslServer

from .conftest import _HF_REPLY_SERIAL, connected
from .fuzz.libdbus import LIB, libdbus_accepts, sealbus_accepts


@pytest.mark.parametrize("key", ["arg\u00b2", "arg\u0661", "arg\u0661path", "arg1\u00b3"])
def test_match_rule_key_with_a_non_ascii_digit_is_invalid(key):
    # "arg²" made int() raise ValueError (the client was dropped with an internal error);
    # "arg\u0661" was taken for arg1 (dbus-daemon knows no such key)
    with pytest.raises(MatchRuleInvalid):
        parse_match_rule(f"{key}='x'")


def test_addmatch_with_a_non_ascii_digit_key_gets_matchruleinvalid_and_keeps_the_connection(sealbus):
    c = connected(sealbus)
    serial = c.call("AddMatch", "s", ("arg\u00b2='x'",))
    reply = c.until(lambda m: m.header.fields.get(_HF_REPLY_SERIAL) == serial)[-1]
    assert reply.header.message_type.name == "error"
    assert reply.header.fields[4] == "org.freedesktop.DBus.Error.MatchRuleInvalid"
    serial = c.call("GetId")
    assert c.until(lambda m: m.header.fields.get(_HF_REPLY_SERIAL) == serial)[-1].header.message_type.name == (
        "method_return"
    )


@pytest.mark.parametrize("encoding", ["UTF-9", "no-such-codec"])
def test_config_with_an_unknown_xml_encoding_is_a_config_error(encoding):
    # expat asked Python's codec registry and a LookupError escaped load_config
    with pytest.raises(ConfigError, match="XML error"):
        parse_config_string(f'<?xml version="1.0" encoding="{encoding}"?><busconfig/>')


def _read_all(inbox: Inbox) -> list:
    """Every message until the peer's close (EOFError); the input is smaller than the socket buffers."""
    out = []
    while True:
        try:
            out += inbox.read()
        except EOFError:
            return out


def _inbox_of(data: bytes) -> Inbox:
    a, b = socket.socketpair()
    a.sendall(data)
    a.close()
    b.setblocking(False)
    return Inbox(b)


@pytest.mark.parametrize(
    "bad",
    [b"{'a'", b"[]", b"1", b"null", b'"text"', b"\xff\xfe{", b"[" * 100_000 + b"]" * 100_000],
    ids=["not-json", "array", "number", "null", "string", "bad-utf8", "deep-nesting"],
)
def test_control_inbox_drops_what_is_not_a_json_object_and_reads_on(bad):
    # the launcher reads the sandboxed broker: a JSONDecodeError, RecursionError or a list that has no
    # .get() ended the launcher's supervision loop
    good = {"type": "audit", "text": "x"}
    inbox = _inbox_of(len(bad).to_bytes(4, "big") + bad + encode(good))
    try:
        assert _read_all(inbox) == [good]
        assert inbox.dropped == 1
    finally:
        inbox.sock.close()


def test_control_inbox_still_reads_objects():
    msgs = [{"type": "ready", "pid": 1}, {"a": [1, {"b": None}]}]
    inbox = _inbox_of(b"".join(encode(m) for m in msgs))
    try:
        assert _read_all(inbox) == msgs and inbox.dropped == 0
    finally:
        inbox.sock.close()


# -- differential findings: sealbus now decides as dbus-daemon / libdbus do ----------------------


@pytest.mark.parametrize("text", ["arg0namespace='org.x',arg0='x'", "arg0='x',arg0namespace='org.x'",
                                  "arg0path='/a/',arg0namespace='org.x'"])  # fmt: skip
def test_match_rule_arg0namespace_with_arg0_or_arg0path_is_invalid(text):
    # dbus-daemon: "Argument arg0namespace matched more than once"; sealbus took both
    with pytest.raises(MatchRuleInvalid):
        parse_match_rule(text)


def test_match_rule_eavesdrop_may_repeat_and_the_last_counts():
    # dbus-daemon accepts a repeated eavesdrop; sealbus refused it as a repeated key
    assert parse_match_rule("eavesdrop=true,eavesdrop=false").eavesdrop is False
    assert parse_match_rule("arg1='x',arg0namespace='org.x'").arg0namespace == "org.x"


def _with_field_10(field: bytes) -> bytes:
    base = encode_header("l", 1, 0, 0, 5, path="/a", member="M")
    fields = base[16 : 16 + int.from_bytes(base[12:16], "little")]
    fields += bytes(-len(fields) % 8) + field
    return base[:12] + len(fields).to_bytes(4, "little") + fields + bytes(-(16 + len(fields)) % 8)


_PATH_FIELD = b"\x0a\x01o\x00\x02\x00\x00\x00/a\x00"


@pytest.mark.parametrize(("field", "valid"), [
    (_PATH_FIELD, True),
    (b"\x0a\x01s\x00\x02\x00\x00\x00ab\x00", False),
    (_PATH_FIELD + bytes(-len(_PATH_FIELD) % 8) + _PATH_FIELD, False),
    (b"\x0a\x01o\x00\x03\x00\x00\x00/a/\x00", False),
    (b"\x0b\x01s\x00\x02\x00\x00\x00ab\x00", True),  # a field libdbus does not know either: accepted, dropped
])  # fmt: skip
def test_header_field_10_is_judged_as_libdbus_does(field, valid):
    # libdbus 1.14 knows field 10 (CONTAINER_INSTANCE): an object path, at most once; sealbus took any
    # type as an unknown field (message_oracle found it)
    raw = _with_field_10(field)
    assert sealbus_accepts(raw)[0] is valid
    if LIB is not None:
        assert libdbus_accepts(raw)[0] is valid
    if valid:
        (m,) = Framer().feed(raw)
        assert b"\x0a\x01o" not in m.header.forward_header(":1.1")  # dropped when forwarded, as unknown fields are


@pytest.mark.parametrize("cut", [None, 1 + MAX_LINE + 1, 1 + MAX_LINE])
def test_sasl_line_of_max_length_does_not_depend_on_where_reads_cut_its_crlf(cut):
    # a line of exactly MAX_LINE bytes was answered when its CRLF came in one read, and refused as
    # "too long" when a read ended between "\r" and "\n" (reasoning about the sasl target's
    # read-size invariant found it; its input is tests/fuzz_corpus/sasl/regression-sasl-crlf-cut)
    data = b"\0" + b"A" * MAX_LINE + b"\r\n"
    s = SaslServer(1000, "0" * 32)
    replies = b"".join(s.feed(part) for part in ([data] if cut is None else [data[:cut], data[cut:]]))
    assert replies == b'ERROR "unknown command"\r\n'


def test_sasl_line_one_byte_too_long_is_refused_however_cut():
    data = b"\0" + b"A" * MAX_LINE + b"\r\r\n"
    for cut in (None, 1 + MAX_LINE + 1, 1 + MAX_LINE + 2):
        s = SaslServer(1000, "0" * 32)
        with pytest.raises(SaslError):
            for part in [data] if cut is None else [data[:cut], data[cut:]]:
                s.feed(part)


def test_body_oracle_compares_a_nan_next_to_a_variant():
    """The body target's jeepney comparison failed on a body with a NaN double and a variant (a long run's
    only finding, in the oracle, not the broker): NaN is never equal to itself, and the repr fallback saw
    sealbus's Variant named tuple where jeepney has a plain tuple."""
    from broker.wire.marshal import Variant

    from .fuzz.body import comparable

    nan = float("nan")
    assert comparable((("d", 2.5), "/a/b", nan, {nan: [1]})) == comparable((Variant("d", 2.5), "/a/b", nan, {nan: [1]}))
    assert comparable(([1],)) != comparable(((1,),))
    assert comparable((nan,)) != comparable((1.0,))


def test_body_oracle_round_trips_a_dict_with_a_repeated_key():
    """The body target's round trip failed on ``aa{saq}`` holding the key "" twice (session 9's long run, in
    the oracle, not the broker): the wire allows a repeated key, libdbus and the validator accept it, and a
    dict keeps one entry. Unmarshalled with ``pairs`` the body marshals back to the same bytes; its input is
    tests/fuzz_corpus/body/regression-body-repeated-dict-key."""
    from broker.wire.marshal import marshal, unmarshal

    from .fuzz.body import TestOneInput

    body = bytes.fromhex("240000001c000000" + "00" * 32)
    assert unmarshal("aa{saq}", body) == ([{"": []}, {}],)  # one entry lost
    entries = unmarshal("aa{saq}", body, pairs=True)
    assert entries == ([[("", []), ("", [])], []],)
    assert marshal("aa{saq}", entries) == body
    TestOneInput(b"\x07aa{saq}l" + body)  # the whole target, libdbus included, on the finding
