"""Micro-benchmark (not a test): header parse + SENDER rewrite throughput.

    .venv/bin/python -m benchmarks.wire_micro

Reports messages/second for a small method call and for a 1 MiB body; the
numbers guide the hot path (the body is never copied, so both should be
close). The header-field cache is cleared every iteration for the "cold" rows.
The "+ body check" rows add the body validation every framed message gets
(broker/wire/body_check.py), with its plans warm as on a live connection.
"""

import time

from broker.wire.body_check import BodyChecker
from broker.wire.marshal import Variant
from broker.wire.message import HeaderView, WireCache, build_message


def bench(raw: bytes, seconds: float = 1.0, cold: bool = False, body: bool = False) -> float:
    view = memoryview(raw)
    cache = WireCache()  # as a connection's framer holds one
    check = BodyChecker().check
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(1000):
            if cold:
                cache.headers.clear()
            h = HeaderView(view, cache=cache)
            if body:
                check(h)
            h.forward_header(":1.42")
        n += 1000
    return n / seconds


def main() -> None:
    small = build_message(1, 7, path="/org/bench/Server", interface="org.bench.Server", member="Ping",
                          destination="org.bench.Server", signature="ay", body=(b"x" * 16,))  # fmt: skip
    large = build_message(1, 8, path="/org/bench/Server", interface="org.bench.Server", member="Blob",
                          destination="org.bench.Server", signature="ay", body=(b"x" * (1 << 20),))  # fmt: skip
    props = build_message(4, 9, path="/org/bench/Obj", interface="org.freedesktop.DBus.Properties",
                          member="PropertiesChanged", signature="sa{sv}as",
                          body=("org.bench.Obj", {"Name": Variant("s", "bench"), "Count": Variant("u", 7),
                                                  "Tags": Variant("as", ["a", "b"])}, []))  # fmt: skip
    for label, raw, cold in (("small call", small, False), ("small call (cold cache)", small, True),
                             ("1 MiB body", large, False), ("1 MiB body (cold cache)", large, True),
                             ("PropertiesChanged", props, False)):  # fmt: skip
        print(f"{label:28s} {bench(raw, cold=cold):12,.0f} msgs/s  parse + SENDER rewrite")
    for label, raw in (("small call", small), ("1 MiB body", large), ("PropertiesChanged", props)):
        print(f"{label + ' + body check':28s} {bench(raw, body=True):12,.0f} msgs/s  parse + check + SENDER rewrite")


if __name__ == "__main__":
    main()
