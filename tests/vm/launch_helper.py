#!/opt/sealbus/venv/bin/python
"""Test stand-in for the launcher's privileged steps, run in sealbus_launch_t.

Installed by the tier with the label sealbus_launch_exec_t, so executing it
from initrc_t enters sealbus_launch_t exactly as the real launcher does. It
lets the socket and mount rules of the policy be tested even while the real
launcher is not finished:
  listen PATH   bind a listening AF_UNIX socket at PATH and accept forever
  mount DIR     mount a tmpfs with context=sealbus_fs_t at DIR (the payload
                fs label, applied the way the launcher applies it to FUSE)
  label DIR     print DIR's SELinux label (only the launcher may look)
  umount DIR    unmount it again (only the launcher may)
"""

import ctypes
import os
import socket
import sys

CONTEXT = "system_u:object_r:sealbus_fs_t:s0"


def listen(path: str) -> int:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    os.chmod(path, 0o666)
    s.listen(16)
    while True:
        conn, _ = s.accept()
        conn.close()


def mount(directory: str) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    opts = f"mode=1777,size=4m,context={CONTEXT}".encode()
    if libc.mount(b"sealbus-probe", directory.encode(), b"tmpfs", 0, opts) != 0:
        err = ctypes.get_errno()
        print("ERR", os.strerror(err), file=sys.stderr)
        return 1
    return 0


def label(directory: str) -> int:
    print(os.getxattr(directory, "security.selinux").decode().rstrip("\0"))
    return 0


def umount(directory: str) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(directory.encode(), 0) != 0:
        print("ERR", os.strerror(ctypes.get_errno()), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    action, arg = sys.argv[1], sys.argv[2]
    sys.exit({"listen": listen, "mount": mount, "label": label, "umount": umount}[action](arg))
