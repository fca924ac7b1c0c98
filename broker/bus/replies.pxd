# Cython declarations for the compiled build (setup.py); replies.py stays the source and runs as is.
# A slot per expected reply, and the registry every call and reply goes through: extension types with C fields.
# ``__dict__`` keeps the registry open to attributes set from outside (as a plain class is).

cdef class ReplySlot:
    cdef public object caller, deadline, replier, serial, timeout

cdef class ReplyRegistry:
    cdef dict __dict__
    cdef public object count, fresh, timed, on_armed
