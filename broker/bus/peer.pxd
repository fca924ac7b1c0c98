# Cython declarations for the compiled build (setup.py); peer.py stays the source and runs as is.
# What every queued message allocates (OutItem) and shares (FdRef), and the Peer (and its UserAccount)
# every message reads and charges, are extension types with C fields. Peer stays a dataclass (Cython makes a cdef class one);
# a field added to it in peer.py must be declared here too, in the same order (the dataclass's argument order).

cdef class UserAccount:
    cdef public object uid, connections, inflight_fds, outgoing_bytes, message_fds, held_fds, quota
    cdef public object pending_starts, start_bytes

cdef class FdRef:
    cdef public object fds, owner, refs, sender, sink

cdef class OutItem:
    cdef public object buffers, charge, fdref, nbytes, owner, settled

cdef class Peer:
    cdef public object id, creds
    cdef public UserAccount account  # charged for every message queued to the peer (never None)
    cdef public object unix_fds, unique_name, names, matches, monitor, monitor_rules
    cdef public object outbox, out_bytes, out_fds, state, reason, wake, kill
    cdef public unsigned long long in_messages, in_bytes, out_messages  # C counters: one add per message
    cdef public Py_ssize_t replies_pending  # one add per call, one subtract per reply
    cdef public object calls, owed, match_keys, starts

    cpdef enqueue(self, OutItem item)
    cpdef item_done(self, OutItem item)
