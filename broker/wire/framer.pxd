# Cython declarations for the compiled build (setup.py); framer.py stays the source and runs as is.
# Framer is an extension type: framing reads its offsets and buffers as C fields, not through attribute
# lookups. ``__dict__`` keeps it open to attributes set from outside (as a plain class is).

cimport cython
from broker.wire.message cimport HeaderView, message_size

cdef class Framer:
    cdef dict __dict__
    cdef public object max_message_size, body_checker, _plans, max_fds_per_message, _bufsize, cache
    cdef public object _buf, _view, _start, _end, _need, fds, _claim, checking

    @cython.locals(header=HeaderView)
    cpdef next_message(self)
    cpdef recv_buffer(self)
    cpdef commit(self, nbytes, fds=*)
