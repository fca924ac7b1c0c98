"""The two socket calls every message makes: one read (bytes and fds) and one write (buffers and fds).

The pure build calls the socket module's ``recvmsg_into`` and ``sendmsg``. The compiled build
makes the same recvmsg(2) and sendmsg(2) calls itself (C helpers in ``sysio.pxd``): the socket
module parses its arguments, builds ancillary-data lists and result tuples and acquires a buffer per
piece on every call, which costs more instructions than the broker's own work on a small message.
Both builds return the same values and raise the same ``OSError`` subclasses (``BlockingIOError``
when the socket has nothing to give or no room).
"""

import array
import socket

import cython

MAX_FDS_PER_READ = 253  # SCM_MAX_FD
ANC_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_READ * 4)
MSG_CMSG_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0x40000000)
MSG_CTRUNC = int(socket.MSG_CTRUNC)  # a plain int: IntFlag arithmetic costs microseconds per read
MAX_IOV = 512  # pieces per write; the compiled write takes up to this many


def fds_from_ancdata(ancdata) -> list[int]:
    fds = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return fds


def recv(fd: int, sock, buf) -> tuple:
    """Read into ``buf`` (writable) from ``sock`` (whose descriptor is ``fd``), fds close-on-exec:
    (bytes read, the fds received (a list, or ``()``), whether control data was truncated)."""
    if cython.compiled:
        return _recv_c(fd, buf)  # noqa: F821 (sysio.pxd, compiled build only)
    n, anc, flags, _ = sock.recvmsg_into([buf], ANC_SPACE, MSG_CMSG_CLOEXEC)
    return n, fds_from_ancdata(anc) if anc else (), (flags & MSG_CTRUNC) != 0


def send(fd: int, sock, bufs: list, fds) -> int:
    """Write ``bufs`` (bytes or memoryviews) in one call, with ``fds`` (None: no fds) attached to its
    first byte; the number of bytes written."""
    if cython.compiled:
        n = _send_c(fd, bufs, fds)  # noqa: F821 (sysio.pxd, compiled build only)
        if n >= 0:
            return n  # else: a piece the C path does not take (see sysio.pxd)
    if fds:
        return sock.sendmsg(bufs, [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    return sock.sendmsg(bufs)
