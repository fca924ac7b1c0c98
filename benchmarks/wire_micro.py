"""Micro-benchmark (not a test): header parse + SENDER rewrite throughput.

    .venv/bin/python -m benchmarks.wire_micro

Reports messages/second for a small method call and for a 1 MiB body; the
numbers guide the hot path (the body is never touched, so both should be
close). The header-field cache is cleared every iteration for the "cold" rows.
"""

import time

from broker.wire.message import HeaderView, WireCache, build_message


def bench(raw: bytes, seconds: float = 1.0, cold: bool = False) -> float:
    view = memoryview(raw)
    cache = WireCache()  # as a connection's framer holds one
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(1000):
            if cold:
                cache.headers.clear()
            h = HeaderView(view, cache=cache)
            h.forward_header(":1.42")
        n += 1000
    return n / seconds


def main() -> None:
    small = build_message(1, 7, path="/org/bench/Server", interface="org.bench.Server", member="Ping",
                          destination="org.bench.Server", signature="ay", body=(b"x" * 16,))  # fmt: skip
    large = build_message(1, 8, path="/org/bench/Server", interface="org.bench.Server", member="Blob",
                          destination="org.bench.Server", signature="ay", body=(b"x" * (1 << 20),))  # fmt: skip
    for label, raw, cold in (("small call", small, False), ("small call (cold cache)", small, True),
                             ("1 MiB body", large, False), ("1 MiB body (cold cache)", large, True)):  # fmt: skip
        print(f"{label:28s} {bench(raw, cold=cold):12,.0f} msgs/s  parse + SENDER rewrite")


if __name__ == "__main__":
    main()
