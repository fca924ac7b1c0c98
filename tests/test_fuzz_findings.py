"""What the fuzz targets found, each as a test of the fixed behaviour (the inputs are in
tests/fuzz_corpus/<target>/crash-* too)."""

import socket

import pytest

from broker.access.config import ConfigError, parse_config_string
from broker.bus.match import MatchRuleInvalid, parse_match_rule
from broker.io.control import Inbox, encode

from .conftest import _HF_REPLY_SERIAL, connected


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
