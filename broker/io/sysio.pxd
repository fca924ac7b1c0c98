# Cython declarations for the compiled build (setup.py); sysio.py stays the source and runs as is.
# The compiled build calls recvmsg(2)/sendmsg(2) directly: the inline helpers below exist only in the
# compiled module (sysio.py calls them under ``cython.compiled``); the pure build uses the socket module.
# Errors are raised as the socket module raises them (PyErr_SetFromErrno: the errno's OSError subclass),
# and a call interrupted by a signal is made again, as the socket module does.

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_SetFromErrno
from libc.errno cimport EINTR, errno
from libc.string cimport strerror
from posix.uio cimport iovec


cdef extern from "Python.h":
    bint PyMemoryView_Check(object)
    bint PyBytes_CheckExact(object)

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    cdef struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    cdef struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type
    ssize_t c_recvmsg "recvmsg" (int, msghdr *, int)
    ssize_t c_sendmsg "sendmsg" (int, const msghdr *, int)
    cmsghdr *CMSG_FIRSTHDR(msghdr *)
    cmsghdr *CMSG_NXTHDR(msghdr *, cmsghdr *)
    unsigned char *CMSG_DATA(cmsghdr *)
    size_t CMSG_LEN(size_t)
    size_t CMSG_SPACE(size_t)
    int SOL_SOCKET, SCM_RIGHTS
    int C_MSG_CTRUNC "MSG_CTRUNC"
    int C_MSG_CMSG_CLOEXEC "MSG_CMSG_CLOEXEC"

cdef enum:
    CONTROL_WORDS = 129  # room for SCM_MAX_FD (253) fds, 8-aligned: CMSG_SPACE(253 * 4) is 1032 bytes
    IOV_MAX_C = 512  # sysio.MAX_IOV

cpdef tuple recv(int fd, sock, buf)
cpdef send(int fd, sock, bufs, fds)


cdef inline tuple _recv_c(int fd, buf):
    cdef Py_buffer view
    cdef iovec iov
    cdef msghdr msg
    cdef unsigned long long control[CONTROL_WORDS]
    cdef cmsghdr *c
    cdef ssize_t n
    cdef size_t i, count
    cdef int *data
    cdef int err = 0
    PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE)
    iov.iov_base = view.buf
    iov.iov_len = view.len
    msg.msg_name = NULL
    msg.msg_namelen = 0
    msg.msg_iov = &iov
    msg.msg_iovlen = 1
    msg.msg_control = control
    msg.msg_controllen = CMSG_SPACE(253 * sizeof(int))
    msg.msg_flags = 0
    while True:
        n = c_recvmsg(fd, &msg, C_MSG_CMSG_CLOEXEC)
        if n >= 0 or errno != EINTR:
            break
    err = errno  # recvmsg's, before releasing the buffer can touch it
    PyBuffer_Release(&view)
    if n < 0:
        raise OSError(err, strerror(err).decode())  # the errno's subclass, as PyErr_SetFromErrno gives
    fds = ()
    if msg.msg_controllen:
        fds = []
        c = CMSG_FIRSTHDR(&msg)
        while c != NULL:
            if c.cmsg_level == SOL_SOCKET and c.cmsg_type == SCM_RIGHTS:
                count = (c.cmsg_len - CMSG_LEN(0)) // sizeof(int)
                data = <int *> CMSG_DATA(c)
                for i in range(count):
                    fds.append(data[i])
            c = CMSG_NXTHDR(&msg, c)
    return n, fds, (msg.msg_flags & C_MSG_CTRUNC) != 0


cdef inline Py_ssize_t _send_c(int fd, object pieces, fds) except -1:
    """Bytes written; -2 if ``pieces`` is not a list, a piece is neither bytes nor a memoryview, or there
    are more pieces or fds than the C path takes (the caller then uses the socket module). A memoryview's
    buffer is acquired as the socket module acquires it (a released or non-contiguous view raises)."""
    cdef iovec iov[IOV_MAX_C]
    cdef Py_buffer views[IOV_MAX_C]
    cdef msghdr msg
    cdef unsigned long long control[CONTROL_WORDS]
    cdef cmsghdr *c
    cdef Py_ssize_t i, nb, held = 0, nfds = 0, n = -2
    cdef int *data
    cdef list bufs
    if type(pieces) is not list:
        return -2
    bufs = pieces
    nb = len(bufs)
    if nb > IOV_MAX_C or (fds and len(fds) > 253):
        return -2
    try:
        for i in range(nb):
            b = bufs[i]
            if PyBytes_CheckExact(b):
                iov[i].iov_base = PyBytes_AS_STRING(b)
                iov[i].iov_len = PyBytes_GET_SIZE(b)
            elif PyMemoryView_Check(b):
                PyObject_GetBuffer(b, &views[held], PyBUF_SIMPLE)
                held += 1
                iov[i].iov_base = views[held - 1].buf
                iov[i].iov_len = views[held - 1].len
            else:
                return -2
        msg.msg_name = NULL
        msg.msg_namelen = 0
        msg.msg_iov = iov
        msg.msg_iovlen = nb
        msg.msg_control = NULL
        msg.msg_controllen = 0
        msg.msg_flags = 0
        if fds:
            nfds = len(fds)
            msg.msg_control = control
            msg.msg_controllen = CMSG_SPACE(nfds * sizeof(int))
            c = CMSG_FIRSTHDR(&msg)
            c.cmsg_level = SOL_SOCKET
            c.cmsg_type = SCM_RIGHTS
            c.cmsg_len = CMSG_LEN(nfds * sizeof(int))
            data = <int *> CMSG_DATA(c)
            for i in range(nfds):
                data[i] = fds[i]
        while True:
            n = c_sendmsg(fd, &msg, 0)
            if n >= 0 or errno != EINTR:
                break
        if n < 0:
            PyErr_SetFromErrno(OSError)
    finally:
        for i in range(held):
            PyBuffer_Release(&views[i])
    return n
