"""The cyclic garbage collector's settings for a process that serves a bus.

Routing allocates short-lived objects only, and start-up allocates long-lived
ones only (modules, the configuration, the bus): with the interpreter's
default threshold (700) the collector walked start-up's objects some 60 times
while trio and the bus were imported (~13 ms of a ~190 ms start, see
docs/performance.md). ``for_serving`` is called first thing by the commands
that serve a bus (``cli.py``) and again by ``serve`` (``io/server.py``), which
also freezes what start-up made.
"""

import gc

THRESHOLD = (50000, 20, 100)  # young objects between collections, then the older generations' ratios


def for_serving() -> None:
    gc.set_threshold(*THRESHOLD)
