"""One action, run by the enforcing tier inside a demo domain (runcon -t ...).

Prints 'OK <detail>' and exits 0, or 'ERR <errno name>' and exits 1, so the
tier can tell an SELinux EACCES from any other failure. Stdlib only: it must
start in a domain that can read nothing but the interpreter and this file."""

import errno
import os
import socket
import sys


def connect(path: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        return "connected"


def write_payload(directory: str) -> str:
    """Create a file on the payload fs, write, read back (the tmpfs stand-in has no seal xattr)."""
    path = os.path.join(directory, f"probe-{os.getpid()}")
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"sealed payload")
        return f"wrote {os.pread(fd, 64, 0)!r}"
    finally:
        os.close(fd)
        os.unlink(path)


def read_file(path: str) -> str:
    with open(path, "rb") as f:
        return f"read {len(f.read())} bytes"


def list_dir(path: str) -> str:
    return f"{len(os.listdir(path))} entries"


def seal_payload(mount: str) -> str:
    """The real FUSE protocol: mkstemp in tmp/, unlink, write, seal, read the cookie."""
    import tempfile

    fd, path = tempfile.mkstemp(dir=os.path.join(mount, "tmp"))
    try:
        os.unlink(path)
        os.write(fd, b"x" * 4096)
        os.setxattr(fd, "user.sealbus.seal", b"")
        cookie = os.getxattr(fd, "user.sealbus.cookie").decode()
        return f"sealed, cookie {cookie[:8]}..."
    finally:
        os.close(fd)


ACTIONS = {"connect": connect, "write-payload": write_payload, "read": read_file, "list": list_dir,
           "seal-payload": seal_payload}


def main() -> int:
    action, arg = sys.argv[1], sys.argv[2]
    try:
        print("OK", ACTIONS[action](arg))
        return 0
    except OSError as e:
        print("ERR", errno.errorcode.get(e.errno, str(e.errno)), e.strerror)
        return 1


if __name__ == "__main__":
    sys.exit(main())
