# Cython declarations for the compiled build (setup.py); server.py stays the source and runs as is.
# Server is an extension type: the flush after every reactor pass reads its dirty set and connections as
# C fields and calls Connection.flush as a C method. ``__dict__`` keeps it open to attributes set from
# outside (as a plain class is).

cimport cython
from broker.bus.peer cimport Peer
from broker.io.connection cimport Connection

cdef class Server:
    cdef dict __dict__
    cdef public object bus, connections, dirty, reactor

    @cython.locals(peer=Peer, conn=Connection)
    cpdef flush_dirty(self)
