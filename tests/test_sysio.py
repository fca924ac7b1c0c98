"""The hot path's socket calls (broker/io/sysio.py): the compiled build's own recvmsg(2)/sendmsg(2) give
what the socket module gives (the pure build), on real sockets: bytes, fds (close-on-exec), end of
stream, the same OSError subclasses, and the socket module's path for what the C path does not take."""

import array
import fcntl
import importlib.util
import os
import socket

import pytest

from broker.io import sysio

PURE = importlib.util.spec_from_file_location("sysio_pure", sysio.__file__.split(".", 1)[0] + ".py")
pure = importlib.util.module_from_spec(PURE)
PURE.loader.exec_module(pure)

BUILDS = [pytest.param(pure, id="pure")]
if not sysio.__file__.endswith(".py"):
    BUILDS.append(pytest.param(sysio, id="compiled"))


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_both_builds_are_tested():
    """Where the hot path is compiled, sysio is too: the C path is the one these tests reach."""
    import broker

    if broker.build() == "compiled":
        assert len(BUILDS) == 2 and not sysio.__file__.endswith(".py")


@pytest.mark.parametrize("io", BUILDS)
def test_recv_bytes_without_fds(io, pair):
    a, b = pair
    a.send(b"hello world")
    buf = bytearray(64)
    view = memoryview(buf)[5:]
    n, fds, truncated = io.recv(b.fileno(), b, view)
    view.release()
    assert (n, fds, truncated) == (11, (), False)
    assert buf[5:16] == b"hello world"


@pytest.mark.parametrize("io", BUILDS)
def test_recv_fds_close_on_exec_in_order(io, pair, tmp_path):
    a, b = pair
    files = [open(tmp_path / f"f{i}", "w") for i in range(3)]
    try:
        a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [f.fileno() for f in files]))])
        n, fds, truncated = io.recv(b.fileno(), b, bytearray(8))
        assert (n, truncated, len(fds)) == (1, False, 3) and type(fds) is list
        for fd, f in zip(fds, files, strict=True):
            assert os.fstat(fd).st_ino == os.fstat(f.fileno()).st_ino
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            os.close(fd)
    finally:
        for f in files:
            f.close()


@pytest.mark.parametrize("io", BUILDS)
def test_recv_truncated_control_data_is_reported_and_every_fd_that_arrived_is_returned(io, pair):
    """SCM_CREDENTIALS (SO_PASSCRED) takes room in the control buffer, so SCM_MAX_FD fds no longer fit: the
    kernel closes what does not fit and sets MSG_CTRUNC; the read says so and hands back every fd it got
    (the broker closes them and disconnects the sender), none lost or leaked."""
    a, b = pair
    b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    r, w = os.pipe()
    sent = [os.dup(r) for _ in range(sysio.MAX_FDS_PER_READ)]
    try:
        a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", sent))])
        for fd in sent:
            os.close(fd)
        before = len(os.listdir("/proc/self/fd"))
        n, fds, truncated = io.recv(b.fileno(), b, bytearray(8))
        assert (n, truncated) == (1, True)
        assert 0 < len(fds) < sysio.MAX_FDS_PER_READ
        assert len(os.listdir("/proc/self/fd")) == before + len(fds)  # exactly the returned ones are open
        for fd in fds:
            assert os.fstat(fd).st_ino == os.fstat(r).st_ino
            os.close(fd)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("io", BUILDS)
def test_recv_end_of_stream_and_nothing_to_read(io, pair):
    a, b = pair
    with pytest.raises(BlockingIOError):
        io.recv(b.fileno(), b, bytearray(8))
    a.shutdown(socket.SHUT_WR)
    assert io.recv(b.fileno(), b, bytearray(8)) == (0, (), False)


@pytest.mark.parametrize("io", BUILDS)
def test_recv_error_is_the_errno_oserror(io, pair):
    a, b = pair
    b.send(b"never read")
    a.close()  # with data unread: the kernel resets the connection
    with pytest.raises(ConnectionResetError):
        io.recv(b.fileno(), b, bytearray(8))


@pytest.mark.parametrize("io", BUILDS)
def test_send_pieces_and_fds(io, pair):
    a, b = pair
    r, w = os.pipe()
    try:
        raw = bytearray(b"..view..")
        pieces = [b"head:", memoryview(raw)[2:6], b":tail"]
        assert io.send(a.fileno(), a, pieces, [r, w]) == 14
        data, anc, flags, _ = b.recvmsg(64, socket.CMSG_SPACE(8))
        assert data == b"head:view:tail" and not flags & socket.MSG_CTRUNC
        got = sysio.fds_from_ancdata(anc)
        assert [os.fstat(fd).st_ino for fd in got] == [os.fstat(r).st_ino, os.fstat(w).st_ino]
        for fd in got:
            os.close(fd)
        assert io.send(a.fileno(), a, [b"no fds"], None) == 6
        assert b.recv(64) == b"no fds"
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("io", BUILDS)
def test_send_falls_back_for_what_the_c_path_does_not_take(io, pair):
    a, b = pair
    assert io.send(a.fileno(), a, (b"tuple ", bytearray(b"bytearray ")), None) == 16
    assert b.recv(64) == b"tuple bytearray "
    with pytest.raises(BufferError):  # the socket module's verdict on a piece that is not contiguous
        io.send(a.fileno(), a, [memoryview(b"a-b-c-")[::2]], None)
    released = memoryview(bytearray(b"gone"))
    released.release()
    with pytest.raises(ValueError):  # a released view is refused, never read
        io.send(a.fileno(), a, [b"x", released], None)
    assert io.send(a.fileno(), a, [b"after"], None) == 5 and b.recv(64) == b"after"


@pytest.mark.parametrize("io", BUILDS)
def test_send_full_socket_and_closed_peer(io, pair):
    a, b = pair
    chunk = b"z" * 65536
    sent = 0
    with pytest.raises(BlockingIOError):
        for _ in range(1000):
            sent += io.send(a.fileno(), a, [chunk], None)
    assert sent > 0
    b.close()
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        io.send(a.fileno(), a, [b"x"], None)
