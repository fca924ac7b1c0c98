# Cython declarations for the compiled build (setup.py); reactor.py stays the source and runs as is.
# Reactor is an extension type: the loop reads its sets and dicts as C fields, not through attribute lookups.
# It serves each ready connection through Connection's C methods (cimport).
# ``__dict__`` keeps it open to attributes set from outside (as a plain class is).

cimport cython
from broker.io.connection cimport Connection

cdef class Reactor:
    cdef dict __dict__
    cdef public object server, poll, ep, conns, writing, closing, touched, touched_before
    cdef public object trio_fds, trio_pending, validating

    @cython.locals(conn=Connection)
    cpdef serve(self, events)
