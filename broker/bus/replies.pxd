# Cython declarations for the compiled build (setup.py); replies.py stays the source and runs as is.
# A slot per expected reply, and the registry every call and reply goes through: extension types with C fields.
# ``__dict__`` keeps the registry open to attributes set from outside (as a plain class is).
# add() and take() run once per call and per reply: C methods on typed peers (their ``calls``, ``owed`` and
# ``replies_pending`` read as C fields). Only a real Peer may be passed where one is typed (never None).

cimport cython
from broker.bus.peer cimport Peer

cdef class ReplySlot:
    cdef public object caller, deadline, replier, serial, timeout

cdef class ReplyRegistry:
    cdef dict __dict__
    cdef public object count, fresh, timed, on_armed

    cpdef ReplySlot add(self, Peer caller, serial, Peer replier, timeout=*)
    @cython.locals(slot=ReplySlot, calls=dict)
    cpdef bint take(self, Peer caller, serial, Peer replier)
