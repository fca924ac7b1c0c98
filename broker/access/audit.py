"""USER_AVC records into the kernel audit log, over the netlink audit socket.

The sandboxed broker has no CAP_AUDIT_WRITE and may not open sockets, so its
SELinux denials travel to the launcher over the control channel and the
launcher writes them here (as dbus-daemon does with libaudit). An in-process
bus run as root writes them itself; without the capability the records stay
in the log only.
"""

import logging
import os
import socket
import struct

log = logging.getLogger("sealbus.audit")

NETLINK_AUDIT = 9
AUDIT_USER_AVC = 1107
NLM_F_REQUEST = 1
NLM_F_ACK = 4
MAX_TEXT = 4096  # the kernel's audit message limit is 8970 bytes; a record never needs more
_NLMSG = struct.Struct("=IHHII")


def user_avc_message(text: str, seq: int = 1) -> bytes:
    """One netlink request carrying a USER_AVC record (NUL-terminated text)."""
    payload = text.encode("utf-8", "replace")[:MAX_TEXT].replace(b"\0", b"?") + b"\0"
    return _NLMSG.pack(_NLMSG.size + len(payload), AUDIT_USER_AVC, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + payload


class AuditWriter:
    """Writes USER_AVC records; after a permanent failure (no audit, no capability) it only logs."""

    def __init__(self):
        self.sock = None
        self.seq = 0
        self.broken = False

    def __call__(self, text: str) -> None:
        log.info("USER_AVC %s", text)
        if self.broken:
            return
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_AUDIT)
                self.sock.settimeout(1.0)
            self.seq = self.seq % 0xFFFFFFFF + 1
            self.sock.sendto(user_avc_message(text, self.seq), (0, 0))
            ack = self.sock.recv(8192)  # NLMSG_ERROR with error 0 on success
            if len(ack) >= 20:
                (err,) = struct.unpack_from("=i", ack, 16)
                if err < 0:
                    raise OSError(-err, os.strerror(-err))
        except OSError as e:
            self.broken = True
            log.warning("cannot write USER_AVC audit records (%s): denials are logged here only", e)
            if self.sock is not None:
                self.sock.close()
                self.sock = None
