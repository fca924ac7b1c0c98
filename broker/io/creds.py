"""Peer credentials from the kernel, read once when a connection is accepted."""

import errno
import os
import socket
import struct

from ..bus.peer import Creds

SO_PEERSEC = getattr(socket, "SO_PEERSEC", 31)
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)


def peer_creds(sock: socket.socket) -> Creds:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return Creds(uid=uid, gids=_peer_groups(sock, gid), pid=pid, label=peer_label(sock))


def _peer_groups(sock: socket.socket, primary: int) -> tuple[int, ...]:
    # Python caps getsockopt buffers at 1024 bytes: 256 groups is the most we see.
    for size in (64 * 4, 1024):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as e:
            if e.errno == errno.ERANGE:
                continue
            if e.errno in (errno.ENOPROTOOPT, errno.EINVAL):
                return (primary,)
            raise
        groups = struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
        return tuple(dict.fromkeys((primary, *groups)))
    return (primary,)


def peer_label(sock: socket.socket) -> str | None:
    """The peer's security label (SO_PEERSEC), or None when no LSM provides one."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERSEC, 1024)
    except OSError as e:
        if e.errno in (errno.ENOPROTOOPT, errno.EINVAL, errno.ERANGE):
            return None
        raise
    label = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    return label or None


def own_creds() -> Creds:
    """The broker process's own identity, for the core's driver (its label from /proc/self/attr/current)."""
    label = None
    try:
        with open("/proc/self/attr/current") as f:
            label = f.read().strip("\0\n") or None
    except OSError:
        pass
    if label in ("unconfined", "kernel"):
        label = None
    return Creds(os.getuid(), tuple(os.getgroups()), os.getpid(), label)
