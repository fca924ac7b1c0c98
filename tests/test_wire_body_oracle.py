"""Differential oracle: sealbus's wire checks (framer + header view + body validation) against
libdbus's ``dbus_message_demarshal``, which validates a whole message the way every libdbus
receiver does. Both must accept and reject the same messages, in both directions, except for the
three deliberate differences listed (and excluded by their exact error) in tests/fuzz/libdbus.py.
The atheris targets ``body`` and ``message_oracle`` (tests/fuzz/) run the same oracle coverage-guided.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.wire.errors import FdIndexError
from broker.wire.message import build_message, encode_header

from .fuzz.libdbus import LIB, announced, disagreement, known_stricter, libdbus_accepts, sealbus_accepts
from .test_wire_props import sig_and_values

pytestmark = pytest.mark.skipif(LIB is None, reason="libdbus-1.so.3 not installed")


def agree(raw: bytes) -> None:
    why = disagreement(raw)
    assert why is None, why


def message(signature: str, body: bytes, endian: str = "l") -> bytes:
    return encode_header(endian, 1, 0, len(body), 7, path="/a", member="M", signature=signature) + body


# -- the cases of the issue, each judged by libdbus too -------------------------------------

ISSUE_CASES = {
    "invalid UTF-8 in s": message("s", b"\2\0\0\0\xc3\x28\0"),
    "string without its NUL": message("su", b"\2\0\0\0abX\0\1\0\0\0"),
    "length past the end": message("s", b"\x64\0\0\0abc\0"),
    "boolean of 2": message("b", b"\0\0\0\2", "B"),
    "array over 64 MiB": message("ay", b"\1\0\0\4" + bytes(8)),
    "100 nested variants": message("v", b"\1v\0" * 100 + b"\1y\0\x2a"),
    "bad object path": message("o", b"\3\0\0\0/a/\0"),
    "bad signature value": message("g", b"\2{s\0"),
    "variant of two types": message("v", b"\2yy\0\1\2"),
    "array off its element boundary": message("ai", b"\5\0\0\0" + bytes(8)),
    "empty array without its padding": message("at", b"\0\0\0\0"),
    "non-zero padding": message("yu", b"\1\0\1\0\5\0\0\0"),
    "trailing bytes": message("u", b"\1\0\0\0\0"),
}


@pytest.mark.parametrize("case", sorted(ISSUE_CASES))
def test_issue_cases_rejected_by_both(case):
    raw = ISSUE_CASES[case]
    assert not sealbus_accepts(raw)[0]
    assert not libdbus_accepts(raw)[0]


def test_64_nested_variants_accepted_by_both_65_by_neither():
    ok = message("v", b"\1v\0" * 63 + b"\1y\0\x2a")
    deep = message("v", b"\1v\0" * 64 + b"\1y\0\x2a")
    assert sealbus_accepts(ok)[0] and libdbus_accepts(ok)[0]
    assert not sealbus_accepts(deep)[0] and not libdbus_accepts(deep)[0]


def test_fd_index_is_where_sealbus_is_stricter():
    raw = message("h", bytes(4))
    assert libdbus_accepts(raw)[0]
    ours, err = sealbus_accepts(raw)
    assert not ours and isinstance(err, FdIndexError)


# -- hypothesis: mutated valid messages ----------------------------------------------------


@st.composite
def mutated_messages(draw):
    sig, values = draw(sig_and_values())
    endian = draw(st.sampled_from("lB"))
    kind = draw(st.sampled_from([1, 2, 3, 4]))
    fields = {1: dict(path="/a/b", interface="org.x.I", member="M", destination="org.x.Y"),
              2: dict(reply_serial=3, destination=":1.7"),
              3: dict(reply_serial=3, error_name="org.x.E"),
              4: dict(path="/s", interface="org.x.S", member="Sig")}[kind]  # fmt: skip
    raw = bytearray(build_message(kind, 9, signature=sig, body=values, endian=endian, **fields))
    for _ in range(draw(st.integers(0, 3))):
        # most mutations hit the body's end of the message, some anywhere
        lo = draw(st.sampled_from([0, max(0, len(raw) - 48)]))
        i = draw(st.integers(lo, len(raw) - 1))
        raw[i] = draw(st.sampled_from([0, 1, 2, 0x7F, 0x80, 0xFF, raw[i] ^ 0x01, raw[i] ^ 0x80]))
    return announced(bytes(raw))  # a shortened message: both judge the message its header announces


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_messages())
def test_sealbus_and_libdbus_agree_on_mutated_messages(raw):
    agree(raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sig_and_values(), st.sampled_from("lB"))
def test_both_accept_every_valid_message(sv, endian):
    sig, values = sv
    raw = build_message(1, 5, path="/a", member="M", signature=sig, body=values, endian=endian)
    assert sealbus_accepts(raw)[0]
    assert libdbus_accepts(raw)[0]


@pytest.mark.parametrize("sender", [":1-4", ":.18"])
def test_unique_names_libdbus_lets_through_are_where_sealbus_is_stricter(sender):
    raw = build_message(4, 3, path="/a", interface="org.x.I", member="S", sender=sender)
    assert libdbus_accepts(raw)[0]
    ours, err = sealbus_accepts(raw)
    assert not ours and known_stricter(err)
    agree(raw)
