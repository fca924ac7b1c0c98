# Cython declarations for the compiled build (setup.py); connection.py stays the source and runs as is.
# Connection is an extension type: reading, routing and flushing read its fields as C fields, not through
# attribute lookups. ``__dict__`` keeps it open to attributes set from outside (as a plain class is).

cimport cython
from broker.bus.peer cimport OutItem, Peer
from broker.bus.router cimport Bus
from broker.io.sysio cimport recv, send
from broker.wire.framer cimport Framer

cdef class Connection:
    cdef dict __dict__
    cdef public object server, bus, sock, fd, creds, peer, framer, head_sent, _state, held_fds

    @cython.locals(peer=Peer, bus=Bus, framer=Framer)
    cpdef _process(self)
    @cython.locals(peer=Peer, head=OutItem, item=OutItem)
    cpdef flush(self)
    @cython.locals(peer=Peer, framer=Framer)
    cpdef on_readable(self)
