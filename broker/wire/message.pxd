# Cython declarations for the compiled build (setup.py); message.py stays the source and runs as is.
# HeaderView is an extension type: its attributes are C fields, set once per message and read by the router.

cimport cython

cdef class HeaderView:
    cdef public object raw, cache, endian, path, interface, member, error_name
    cdef public object destination, sender, signature, fwd
    cdef public object body_len, serial, reply_serial, header_len, fields_end
    cdef public object type, flags, unix_fds, unknown_fields

    cpdef forward(self, sender)

@cython.locals(kind=int, version=int, body_len=Py_ssize_t, fields_len=Py_ssize_t, total=Py_ssize_t)
cpdef message_size(buf, max_size=*, offset=*)
