"""Property tests: random signatures and values round-trip, and differential
testing against jeepney (an independent implementation) in both endiannesses."""

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jeepney import DBusAddress, new_method_call
from jeepney.low_level import Endianness, Parser

from broker.wire.errors import WireError
from broker.wire.marshal import Variant, marshal, unmarshal
from broker.wire.message import HeaderView, WireCache, build_message

INTS = {"y": (0, 255), "n": (-(2**15), 2**15 - 1), "q": (0, 2**16 - 1), "i": (-(2**31), 2**31 - 1),
        "u": (0, 2**32 - 1), "x": (-(2**63), 2**63 - 1), "t": (0, 2**64 - 1)}  # fmt: skip
text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=20)
path = st.lists(st.from_regex(r"[A-Za-z0-9_]{1,6}", fullmatch=True), max_size=4).map(lambda p: "/" + "/".join(p))
basic_sig = st.sampled_from(list("ybnqiuxtdsog"))


def basic_value(c):
    if c in INTS:
        return st.integers(*INTS[c])
    return {
        "b": st.booleans(),
        "d": st.floats(allow_nan=False, width=64),
        "s": text,
        "o": path,
        "g": st.sampled_from(["", "i", "as", "a{sv}", "(yv)"]),
    }[c]


def typed(depth=0):
    """(signature, value-strategy) pairs, recursively."""
    base = basic_sig.map(lambda c: (c, basic_value(c)))
    if depth >= 3:
        return base

    def array(inner):
        sig, strat = inner
        return ("a" + sig, st.lists(strat, max_size=4) if sig != "y" else st.binary(max_size=16))

    def struct(items):
        return ("(" + "".join(s for s, _ in items) + ")", st.tuples(*[v for _, v in items]))

    def dict_(kv):
        (k, ks), (v, vs) = kv
        return ("a{" + k + v + "}", st.dictionaries(ks, vs, max_size=3))

    def variant(inner):
        sig, strat = inner
        return ("v", strat.map(lambda x: Variant(sig, x)))

    sub = typed(depth + 1)
    return st.one_of(
        base,
        sub.map(array),
        st.lists(sub, min_size=1, max_size=3).map(struct),
        st.tuples(basic_sig.map(lambda c: (c, basic_value(c))), sub).map(dict_),
        sub.map(variant),
    )


@st.composite
def sig_and_values(draw):
    items = draw(st.lists(typed(), min_size=1, max_size=4))
    sig = "".join(s for s, _ in items)
    values = tuple(draw(v) for _, v in items)
    return sig, values


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


FAST = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@FAST
@given(sig_and_values(), st.sampled_from("lB"))
def test_round_trip(sv, endian):
    sig, values = sv
    raw = marshal(sig, values, endian)
    assert same(unmarshal(sig, raw, endian), values)


@FAST
@given(sig_and_values(), st.sampled_from([Endianness.little, Endianness.big]))
def test_jeepney_marshalled_parses_identically(sv, endian):
    sig, values = sv
    msg = new_method_call(DBusAddress("/a/b", bus_name="org.x.Y", interface="org.x.I"), "M", sig, values)
    msg.header.endianness = endian
    raw = msg.serialise(serial=42)
    h = HeaderView(memoryview(raw))
    assert (h.path, h.interface, h.member, h.destination, h.serial, h.signature) == \
        ("/a/b", "org.x.I", "M", "org.x.Y", 42, sig)  # fmt: skip
    assert same(h.unmarshal_body(), values)


@FAST
@given(sig_and_values(), st.sampled_from("lB"))
def test_ours_parses_identically_with_jeepney(sv, endian):
    sig, values = sv
    raw = build_message(1, 42, path="/a/b", interface="org.x.I", member="M", destination="org.x.Y",
                        signature=sig, body=values, endian=endian)  # fmt: skip
    p = Parser()
    p.add_data(raw)
    m = p.get_next_message()
    f = {k.value: v for k, v in m.header.fields.items()}
    assert f[1] == "/a/b" and f[2] == "org.x.I" and f[3] == "M" and f[6] == "org.x.Y" and f[8] == sig
    assert m.header.serial == 42
    assert same(tuple(m.body), values)
    # and after the bus's SENDER rewrite, jeepney still agrees
    h = HeaderView(memoryview(raw))
    p.add_data(h.forward_header(":1.7") + bytes(h.body))
    m2 = p.get_next_message()
    assert {k.value: v for k, v in m2.header.fields.items()}[7] == ":1.7"
    assert same(tuple(m2.body), values)


@FAST
@given(sig_and_values(), st.sampled_from("lB"), st.data())
def test_corrupted_body_only_raises_wire_error(sv, endian, data):
    """Flip, cut or extend a valid encoding: the result decodes or raises WireError, nothing else."""
    sig, values = sv
    raw = bytearray(marshal(sig, values, endian))
    op = data.draw(st.sampled_from(["flip", "cut", "extend"]))
    if op == "flip" and raw:
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= 1 << data.draw(st.integers(0, 7))
    elif op == "cut" and raw:
        del raw[data.draw(st.integers(0, len(raw) - 1)) :]
    else:
        raw += data.draw(st.binary(min_size=1, max_size=9))
    try:
        unmarshal(sig, bytes(raw), endian, n_fds=data.draw(st.integers(0, 3)))
    except WireError:
        pass


@FAST
@given(st.sampled_from("lB"), st.binary(max_size=64), st.data())
def test_random_header_bytes_only_raise_wire_error(endian, junk, data):
    """A valid message prefix with random bytes spliced into the header fields."""
    raw = bytearray(build_message(1, 1, path="/a", interface="org.x.I", member="M", signature="s",
                                  body=("x",), endian=endian))  # fmt: skip
    at = data.draw(st.integers(12, len(raw)))
    raw[at : at + len(junk)] = junk
    try:
        h = HeaderView(memoryview(raw))
        h.forward_header(":1.1")
        h.unmarshal_body()
    except WireError:
        pass


_FIELD_VIEW = ("type", "flags", "serial", "path", "interface", "member", "error_name", "reply_serial",
               "destination", "sender", "signature", "unix_fds", "unknown_fields")  # fmt: skip
header_fields = st.fixed_dictionaries({"msg_type": st.sampled_from([2, 3, 4])}, optional={
    "path": st.sampled_from(["/a", "/a/b", "/org/x"]),
    "interface": st.sampled_from(["org.x.I", "org.y.Jj"]),
    "member": st.sampled_from(["M", "Mm", "Member"]),
    "destination": st.sampled_from([":1.7", "org.x.D"]),
    "reply_serial": st.integers(1, 2**32 - 1),
    "unix_fds": st.integers(1, 2**32 - 1),
})  # fmt: skip


_PROP_CACHE = WireCache(max_headers=4096)


@settings(max_examples=300, deadline=None)
@given(st.lists(header_fields, min_size=2, max_size=12), st.sampled_from("lB"))
def test_header_cache_never_changes_what_a_header_says(blocks, endian):
    """Whatever order field blocks arrive in, a header read through the cache says exactly
    what a fresh parse of the same bytes says (and is forwarded with those fields)."""
    from broker.wire.errors import WireError as _WireError
    from broker.wire.message import encode_header

    cache = _PROP_CACHE  # kept across examples: states left by earlier ones are part of the search
    for i, f in enumerate(blocks):
        f = dict(f)
        t = f.pop("msg_type")
        if t == 4:
            f.setdefault("path", "/a")
            f.setdefault("interface", "org.x.I")
            f.setdefault("member", "M")
        if t == 3:
            f["error_name"] = "org.x.Error"
        raw = encode_header(endian, t, 0, 0, i + 1, **f)
        try:
            cached = HeaderView(memoryview(raw), cache=cache)
        except _WireError:
            continue
        fresh = HeaderView(memoryview(raw))  # no cache: parsed afresh
        assert [getattr(cached, a) for a in _FIELD_VIEW] == [getattr(fresh, a) for a in _FIELD_VIEW]
        out = HeaderView(cached.forward_header(":1.42"))
        assert [getattr(out, a) for a in _FIELD_VIEW if a != "sender"] == \
            [getattr(fresh, a) for a in _FIELD_VIEW if a != "sender"]  # fmt: skip
