# Cython declarations for the compiled build (setup.py); peer.py stays the source and runs as is.
# What every queued message allocates (OutItem) and shares (FdRef) are extension types with C fields.

cdef class FdRef:
    cdef public object fds, owner, refs, sender, sink

cdef class OutItem:
    cdef public object buffers, charge, fdref, nbytes, owner, settled
