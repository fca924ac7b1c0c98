# Cython declarations for the compiled build (setup.py); router.py stays the source and runs as is.
# Bus is an extension type: routing reads the registries it uses for every message as C fields, not through
# attribute lookups. What other layers set on a Bus (server, payload, spawn...) stays in its ``__dict__``,
# as on a plain class, except what every message reads (policy, limits, fd_vetter): C fields
# (tests/test_bus_peers.py lists them all).
# The routing steps every message takes are C methods on typed peers and headers: their fields are read as
# C fields. They cimport Peer and HeaderView, so this module runs compiled only when peer and message do
# (broker/__init__.py: runs_compiled). Only a real Peer may be passed where one is typed (never None).

cimport cython
from broker.bus.peer cimport FdRef, OutItem, Peer
from broker.bus.replies cimport ReplyRegistry
from broker.wire.message cimport HeaderView

cdef class Bus:
    cdef dict __dict__
    cdef public object fd_quota, conns, peers, registry, matches, eavesdroppers, monitoring, monitors
    cdef public object serial, stats, closing, driver, activator
    cdef public object policy, limits, fd_vetter  # read for every message; set by other layers too
    cdef public ReplyRegistry replies
    cdef public unsigned long long messages  # a C counter: one add per message

    @cython.locals(h=HeaderView)
    cpdef dispatch(self, Peer peer, msg)
    cdef _route(self, Peer peer, HeaderView h, fdref)
    @cython.locals(is_call=bint, wants_reply=bint)
    cdef _unicast(self, Peer peer, HeaderView h, fdref, Peer target, bint seen=*)
    cdef _route_reply(self, Peer peer, HeaderView h, fdref, Peer target)
    cdef _cannot_queue(self, sender, Peer target, nbytes, fdref)
    cdef _push(self, Peer target, bufs, nbytes, fdref, sender)
