"""Large bodies are validated in steps of bounded work (broker/wire/body_check.py ``steps``, the
framer's ``checking`` state): same verdicts as the one-shot check, each step a bounded number of
values, messages of one connection in order, and the fds of a message still being validated go back
to the framer's close path."""

import struct
from contextlib import contextmanager
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.wire import body_check, framer
from broker.wire.body_check import SLICE, BodyChecker
from broker.wire.errors import InvalidValueError, LimitExceededError, SignatureError, TruncatedError, WireError
from broker.wire.framer import Framer
from broker.wire.marshal import marshal
from broker.wire.message import build_message, encode_header

from .test_wire_props import sig_and_values


def message(signature: str, body: bytes, endian: str = "l", unix_fds: int = 0, serial: int = 7) -> bytes:
    hdr = encode_header(endian, 1, 0, len(body), serial, path="/a", interface="org.x.I", member="M",
                        destination="org.x.Y", signature=signature, unix_fds=unix_fds)  # fmt: skip
    return hdr + body


@contextmanager
def stepped(slice_bytes: int):
    """Every body goes through the stepped walk, in steps of ``slice_bytes``."""
    with mock.patch.object(framer, "INCREMENTAL_MIN", 0), mock.patch.object(body_check, "SLICE", slice_bytes):
        yield


def verdict(fn):
    try:
        fn()
    except WireError as e:
        return type(e)
    return None


def one_shot(sig: str, body: bytes, endian: str):
    return verdict(lambda: BodyChecker().check_body(sig, body, endian))


def in_steps(sig: str, body: bytes, endian: str):
    return verdict(lambda: Framer().feed(message(sig, body, endian)))


# -- same verdicts -------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sig_and_values(), st.sampled_from("lB"), st.data(), st.sampled_from([1, 4, 8, 16, 64]))
def test_steps_judge_as_the_one_shot_check(sv, endian, data, slice_bytes):
    sig, values = sv
    body = bytearray(marshal(sig, values, endian))
    if body and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(body) - 1))
        body[i] = data.draw(st.sampled_from([0, 1, 2, 0x7F, 0x80, 0xFF, body[i] ^ 0x01, body[i] ^ 0x80]))
    body = bytes(body)
    with stepped(slice_bytes):
        assert in_steps(sig, body, endian) == one_shot(sig, body, endian)


def dense(sig: str, n: int) -> bytes:
    """A large body of ``n`` small elements (plus a final 2-element array where it nests)."""
    if sig == "as":
        elems = b"".join(b"\0\0\0\0\0\0\0\0" for _ in range(n))[:-3]  # empty strings, padded between
    elif sig == "ag":
        elems = b"\0\0" * n
    elif sig == "aay":
        elems = b"\0\0\0\0" * n
    elif sig == "av":
        elems = b"\1y\0\7" * n
    else:
        raise AssertionError(sig)
    return struct.pack("<I", len(elems)) + elems


def array_of(elems: bytes, align: int = 4) -> bytes:
    return struct.pack("<I", len(elems)) + bytes(align - 4) + elems


BAD_TAILS = {  # a large body with one bad value at its very end: the last step finds it
    "as": (b"\1\0\0\0\xff\0", InvalidValueError),
    "ag": (b"\1(\0", SignatureError),
    "aay": (b"\1\0\0\0", TruncatedError),  # an array of 1 byte announced, the body ends
    "av": (b"\1b\0\0\7\0\0\0", InvalidValueError),  # boolean 7
}


@pytest.mark.parametrize("sig", sorted(BAD_TAILS))
def test_large_dense_bodies_valid_and_invalid(sig):
    body = dense(sig, 40_000)
    assert len(body) > framer.INCREMENTAL_MIN
    assert one_shot(sig, body, "l") is None
    (m,) = Framer().feed(message(sig, body))
    assert bytes(m.header.raw[m.header.header_len :]) == body
    tail, error = BAD_TAILS[sig]
    elems = body[4:]
    pad = (-len(elems)) % 4 if sig == "as" else 0
    bad_elems = elems + bytes(pad) + tail
    bad = struct.pack("<I", len(bad_elems)) + bad_elems
    assert one_shot(sig, bad, "l") is error
    assert in_steps(sig, bad, "l") == one_shot(sig, bad, "l")


def test_nesting_limit_holds_in_steps():
    # an array of one variant holding 70 nested variants: deeper than 64, found as by the one-shot walk
    elem = b"\1v\0" * 70 + b"\1y\0\7"
    body = struct.pack("<I", len(elem)) + elem
    assert one_shot("av", body, "l") is LimitExceededError
    with stepped(1):
        assert in_steps("av", body, "l") is LimitExceededError


# -- bounded steps -------------------------------------------------------------------


def counting_checker(monkeypatch, code: str):
    """A checker whose basic check of ``code`` counts its calls (reset by the test between steps)."""
    calls = [0]
    inner = body_check._BASIC["l"][code]

    def counted(b, p, d, f):
        calls[0] += 1
        return inner(b, p, d, f)

    counted.gen = None
    monkeypatch.setitem(body_check._BASIC["l"], code, counted)
    monkeypatch.setitem(body_check._BASIC_CODES["l"], ord(code), counted)
    return BodyChecker(), calls


def max_values_per_step(checker, calls, sig: str, body: bytes) -> tuple[int, int]:
    f = Framer(body_checker=checker)
    f.push(message(sig, body))
    steps = worst = 0
    while True:
        calls[0] = 0
        m = f.next_message()
        worst = max(worst, calls[0])
        steps += 1
        if m is not None:
            return steps, worst
        assert f.checking is not None


@pytest.mark.parametrize(
    ("sig", "make"),
    [
        ("as", lambda: dense("as", 200_000)),  # 1.6 MB of empty strings
        ("aas", lambda: array_of(dense("as", 200_000))),  # ... as one huge element
        ("av", lambda: array_of(b"\2as\0" + dense("as", 200_000))),  # ... in a variant
        ("a(sas)", lambda: array_of(b"\1\0\0\0x\0\0\0" + dense("as", 200_000), 8)),  # ... in a struct
        ("a{sas}", lambda: array_of(b"\1\0\0\0x\0\0\0" + dense("as", 200_000), 8)),  # ... in a dict entry
    ],
)
def test_each_step_checks_a_bounded_number_of_values(monkeypatch, sig, make):
    body = make()
    checker, calls = counting_checker(monkeypatch, "s")
    assert one_shot(sig, body, "l") is None
    steps, worst = max_values_per_step(checker, calls, sig, body)
    # an empty string takes 8 bytes: a step checks at most a slice of them (and the one crossing its
    # end), and once more as many when it gives up a try at an element larger than a slice
    assert worst <= 2 * (SLICE // 8 + 2)
    assert steps >= len(body) // SLICE


def test_small_bodies_are_checked_at_once():
    f = Framer()
    f.push(message("as", marshal("as", (["x"] * 100,))))
    assert f.next_message() is not None
    assert f.checking is None


# -- the framer's state --------------------------------------------------------------


def test_messages_after_a_large_one_wait_for_it():
    big = message("as", dense("as", 40_000), serial=1)
    small = build_message(1, 2, path="/a", member="M", destination="org.x.Y", signature="s", body=("hi",))
    f = Framer()
    f.push(big + small)
    assert f.next_message() is None  # the large one is being validated: nothing is handed out
    assert f.checking is not None
    out = list(f.messages())
    assert [m.header.serial for m in out] == [1, 2]


def test_fds_of_a_message_being_validated_go_back_on_close():
    f = Framer()
    f.push(message("has", struct.pack("<I", 0) + dense("as", 40_000), unix_fds=2))
    f.fds.extend([-5, -6, -7])  # two for this message, one for a next one
    assert f.next_message() is None
    assert f.checking is not None
    assert list(f.fds) == [-7]  # its own two are out of the pool: the next message may claim the third
    assert f.close() == [-5, -6, -7]  # disconnected mid-validation: every fd goes to the close path
    assert f.checking is None


def test_fds_of_an_invalid_large_body_go_back_and_nothing_is_handed_out():
    bad = dense("as", 40_000)[:-1] + b"\1"  # the last string is not NUL-terminated
    f = Framer()
    f.push(message("has", struct.pack("<I", 0) + bad, unix_fds=1))
    f.fds.append(-9)
    with pytest.raises(InvalidValueError):
        list(f.messages())
    assert f.checking is None
    assert f.close() == [-9]


# -- one long value ------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="/aZ9_-.\0\u00e9", max_size=12), st.booleans())
def test_long_object_paths_judged_as_the_regex_judges_them(tail, long_prefix):
    path = (b"/ab" * 2000 if long_prefix else b"") + tail.encode()
    if path == b"/":
        return  # never long: the regex's
    assert body_check._valid_long_path(path, 0, len(path)) == (body_check._PATH.fullmatch(path) is not None)


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        (b"/a_9" * 5000, True),
        (b"/a_9" * 5000 + b"/", False),
        (b"/a" * 5000 + b"//b", False),
        (b"/a" * 5000 + b"-", False),
    ],
)
def test_a_long_object_path_is_checked_without_the_regex(monkeypatch, path, ok):
    monkeypatch.setattr(body_check, "_PATH", None)  # a path over PATH_REGEX_MAX never reaches it
    body = struct.pack("<I", len(path)) + path + b"\0"
    assert (one_shot("o", body, "l") is None) == ok
