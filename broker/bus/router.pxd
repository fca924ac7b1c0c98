# Cython declarations for the compiled build (setup.py); router.py stays the source and runs as is.
# Bus is an extension type: routing reads the registries it uses for every message as C fields, not through
# attribute lookups. What other layers set on a Bus (server, policy, limits...) stays in its ``__dict__``,
# as on a plain class (tests/test_bus_peers.py lists them).

cdef class Bus:
    cdef dict __dict__
    cdef public object fd_quota, conns, peers, registry, matches, eavesdroppers, replies, monitoring, monitors
    cdef public object serial, stats, closing, driver, activator
