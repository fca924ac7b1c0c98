"""Target ``body``: the body validator, with libdbus as the oracle in both directions.

Input: a signature length byte, the signature, a byte-order byte, then the body. The body is
wrapped in a valid method-call header.
Invariants:
- only WireError escapes the validator;
- one-shot validation (``check``, by a checker that keeps its compiled plans from input to input,
  as a connection's does) and validation in steps (``steps``, as the framer does for large bodies,
  by a fresh checker that compiles the plan anew) give the same verdict;
- an accepted body unmarshals, and marshals back to the same bytes (dict entries read as the
  wire holds them: a key may repeat);
- jeepney (a parser nobody here wrote) reads an accepted fd-less body as the same values;
- sealbus and libdbus accept and reject the same messages (except the listed, deliberate
  strictness in tests/fuzz/libdbus.py).
"""

import math

from jeepney.low_level import Parser

from broker.wire.body_check import BodyChecker
from broker.wire.errors import WireError
from broker.wire.marshal import marshal, unmarshal
from broker.wire.message import HeaderView, encode_header

from .libdbus import LIB, disagreement

N_FDS = 2
CHECKER = BodyChecker()  # long-lived, as a connection's: plans compiled once per signature (bounded)


def wrap(signature: str, body: bytes, endian: str) -> bytes | None:
    try:
        return encode_header(endian, 1, 0, len(body), 7, path="/a", member="M", signature=signature,
                             unix_fds=N_FDS) + body  # fmt: skip
    except WireError:
        return None  # not a valid signature: the header view's business, not the body's


def _verdict(fn) -> type | None:
    try:
        fn()
    except WireError as e:
        return type(e)
    return None


def _stepwise(h) -> None:
    steps = BodyChecker().steps(h)
    if steps is not None:
        for _ in steps:
            pass


def TestOneInput(data: bytes) -> None:
    if len(data) < 2:
        return
    n = data[0] % 40
    try:
        signature = data[1 : 1 + n].decode("ascii")
    except UnicodeDecodeError:
        return
    endian = "B" if data[1 + n : 2 + n] == b"B" else "l"
    raw = wrap(signature, data[2 + n :], endian)
    if raw is None:
        return
    try:
        h = HeaderView(raw)
    except WireError:
        h = None  # a header the view refuses (e.g. a bad signature): libdbus must refuse it too
    if h is not None:
        check_validator(h, signature, endian)
    if LIB is not None:
        why = disagreement(raw)
        assert why is None, why


def check_validator(h, signature: str, endian: str) -> None:
    one = _verdict(lambda: CHECKER.check(h))
    assert one == _verdict(lambda: _stepwise(h)), "check and steps disagree"
    if one is None:
        values = h.unmarshal_body()
        entries = unmarshal(signature, h.body, endian, h.unix_fds, pairs=True)  # a repeated dict key kept
        assert marshal(signature, entries, endian) == bytes(h.body), "accepted body does not round-trip"
        check_jeepney(signature, bytes(h.body), endian, values)


def check_jeepney(signature: str, body: bytes, endian: str, values: tuple) -> None:
    """jeepney reads the message (without its UNIX_FDS, which it would want real fds for) as we do."""
    raw = encode_header(endian, 1, 0, len(body), 7, path="/a", member="M", signature=signature) + body
    try:
        CHECKER.check(HeaderView(raw))
    except WireError:
        return  # the body holds fd indexes: valid only with the fds
    p = Parser()
    p.add_data(raw)
    theirs = tuple(p.get_next_message().body)
    assert comparable(theirs) == comparable(values), f"jeepney reads {theirs!r:.200}, sealbus {values!r:.200}"


def comparable(value):
    """``value`` with what ``==`` gets wrong made comparable: a NaN (never equal to itself) as a marker, a
    Variant (a named tuple) as jeepney's plain (signature, value) tuple, a dict as its items in wire order
    (a NaN key)."""
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, (tuple, list)):
        return type(value) is list, [comparable(v) for v in value]
    if isinstance(value, dict):
        return "dict", [(comparable(k), comparable(v)) for k, v in value.items()]
    return value
