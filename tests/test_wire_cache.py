"""WireCache: the header parser's caches are objects of their owner, bounded, and shared with nobody."""

from broker.wire import message as wm
from broker.wire.framer import Framer
from broker.wire.message import HeaderView, WireCache, build_message

_VIEW = ("type", "flags", "serial", "path", "interface", "member", "error_name", "reply_serial",
         "destination", "sender", "signature", "unix_fds", "unknown_fields")  # fmt: skip


def call(i: int = 0, member: str = "M", serial: int = 1) -> bytes:
    return build_message(1, serial, path=f"/p{i}", interface="org.x.I", member=member, destination="org.x.D",
                         signature="s", body=("x",))  # fmt: skip


def reply(rs: int, dest: str = ":1.7") -> bytes:
    return build_message(2, rs + 1000, reply_serial=rs, destination=dest, signature="s", body=("r",))


def module_state() -> dict[str, int]:
    """Size of every mutable container at module level in broker.wire.message."""
    return {k: len(v) for k, v in vars(wm).items() if isinstance(v, dict | list | set | bytearray)}


def test_a_hit_reads_what_a_fresh_parse_reads_and_adds_no_entry():
    cache = WireCache()
    first = HeaderView(memoryview(call(serial=1)), cache=cache)
    assert len(cache.headers) == 1
    again = HeaderView(memoryview(call(serial=2)), cache=cache)
    fresh = HeaderView(memoryview(call(serial=2)))
    assert len(cache.headers) == 1
    assert [getattr(again, a) for a in _VIEW] == [getattr(fresh, a) for a in _VIEW]
    assert again.serial == 2 and first.serial == 1
    assert again.fwd is first.fwd is not None  # the forwarded-header memo of the block is shared too


def test_each_table_stays_within_its_bound():
    cache = WireCache(max_headers=8, max_strings=16, max_forward_parts=4, max_sender_fields=3)
    for i in range(200):
        h = HeaderView(memoryview(call(i, member=f"M{i}")), cache=cache)
        h.forward(f":1.{i}")
        r = HeaderView(memoryview(reply(i + 1, dest=f":1.{i}")), cache=cache)
        r.forward(f":2.{i}")
        assert len(cache.headers) <= 8
        assert len(cache.strings) <= 16
        assert len(cache.forward_parts) <= 4
        assert len(cache.sender_fields) <= 3
        assert len(cache.reply_serial_at) <= 8
    assert len(cache) > 0


def test_long_strings_are_not_kept():
    """The tables are bounded by entry count, so no entry may be large: a header string over 255 bytes
    (only an object path can be) is validated every time and never stored."""
    cache = WireCache()
    long_path = "/p" + "/x" * 5000
    raw = build_message(1, 1, path=long_path, interface="org.x.I", member="M", destination="org.x.D")
    h = HeaderView(memoryview(raw), cache=cache)
    assert h.path == long_path
    assert long_path not in cache.strings.values() and len(cache.strings) == 3
    assert all(len(k[1]) <= 255 for k in cache.strings)


def test_reply_serial_offsets_go_with_the_headers_they_describe():
    cache = WireCache(max_headers=2)
    HeaderView(memoryview(reply(5)), cache=cache)
    assert len(cache.reply_serial_at) == 1
    HeaderView(memoryview(call(1)), cache=cache)
    HeaderView(memoryview(call(2)), cache=cache)  # full: cleared, then this one added
    assert len(cache.headers) == 1 and not cache.reply_serial_at


def test_clear_empties_every_table():
    cache = WireCache()
    HeaderView(memoryview(reply(5)), cache=cache).forward(":1.1")
    assert len(cache) >= 4
    cache.clear()
    assert len(cache) == 0


def test_two_caches_share_nothing():
    a, b = WireCache(), WireCache()
    HeaderView(memoryview(call()), cache=a).forward(":1.1")
    assert len(a) > 0 and len(b) == 0
    HeaderView(memoryview(call()), cache=b)
    a.clear()
    assert len(b.headers) == 1


def test_without_a_cache_nothing_is_kept_anywhere():
    before = module_state()
    for i in range(50):
        HeaderView(memoryview(call(i, member=f"M{i}"))).forward(f":1.{i}")
        HeaderView(memoryview(reply(i + 1))).forward(f":1.{i}")
    assert module_state() == before


def test_forwarded_headers_are_the_same_with_and_without_a_cache():
    cache = WireCache()
    for raw in (call(), call(serial=9), reply(3), reply(4), reply(4, dest=":1.9")):
        for sender in (":1.1", ":1.2", ":1.1"):
            cached = HeaderView(memoryview(raw), cache=cache).forward_header(sender)
            assert cached == HeaderView(memoryview(raw)).forward_header(sender)


def test_every_framer_owns_its_cache_unless_given_one():
    f1, f2 = Framer(), Framer()
    f1.feed(call(serial=1))  # a connection's first message (its Hello) is parsed without a cache
    f2.feed(call(serial=1))
    assert f1.cache is None and f2.cache is None
    (m,) = f1.feed(call(serial=2))
    f2.feed(reply(3))
    assert f1.cache is not f2.cache
    assert m.header.cache is f1.cache and len(f1.cache.headers) == 1 and f1.cache.headers != f2.cache.headers
    shared = WireCache.for_bus()
    assert shared.max_headers > WireCache().max_headers
    f3, f4 = Framer(cache=shared), Framer(cache=shared)
    f3.feed(call())
    (m,) = f4.feed(call(serial=2))
    assert f3.cache is f4.cache is shared and len(shared.headers) == 1 and m.header.serial == 2


def test_a_connection_that_only_said_hello_keeps_no_header_cache_nor_body_checker():
    """Idle connections are most of a session bus: Hello's header is never seen again on its connection,
    so it fills no cache, and a framer with no body yet holds no body checker (docs/performance.md)."""
    hello = build_message(1, 1, path="/org/freedesktop/DBus", interface="org.freedesktop.DBus",
                          member="Hello", destination="org.freedesktop.DBus")  # fmt: skip
    f = Framer()
    (m,) = f.feed(hello)
    assert m.header.member == "Hello" and m.header.cache is None
    assert f.cache is None and f.body_checker is None
    (m2,) = f.feed(call(serial=2))  # the second message: its own cache and checker from now on
    assert m2.header.cache is f.cache is not None and len(f.cache.headers) == 1
    assert f.body_checker is not None and "s" in f.body_checker.plans
    (m3,) = f.feed(call(serial=3))
    assert m3.header.cache is f.cache and len(f.cache.headers) == 1  # a hit: the same block
