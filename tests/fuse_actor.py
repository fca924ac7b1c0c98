"""A payload-fs client run as another uid by tests/test_fuse_*.py.

Reads one JSON command per line on stdin and answers one JSON line on stdout:
{"ok": result} or {"errno": "EACCES"}. It keeps the fds and mappings it made,
so a test can act on them step by step (write through a mapping after the
seal, claim while the file is still open, ...).
"""

import errno
import hashlib
import json
import mmap
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from broker.client import fuse_payload

fds: dict[int, int] = {}
maps: dict[int, mmap.mmap] = {}
received: list[int] = []


def pattern(n: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(f"payload-{seed}".encode()).digest(n) if n else b""


def do(cmd: dict):  # noqa: C901
    op = cmd["op"]
    if op == "uid":
        return os.getuid()
    if op == "dance":  # mkstemp, unlink, mmap write + msync, seal, cookie
        data = pattern(cmd["size"], cmd.get("seed", 0))
        fd, ck = fuse_payload.create_sealed(cmd["mount"], data, use_mmap=cmd.get("mmap", True))
        fds[fd] = fd
        return {"fd": fd, "cookie": ck, "sha": hashlib.sha256(data).hexdigest()}
    if op == "mkstemp":
        fd = os.open(os.path.join(cmd["mount"], "tmp", cmd["name"]), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fds[fd] = fd
        st = os.fstat(fd)
        return {"fd": fd, "mode": st.st_mode & 0o7777, "uid": st.st_uid}
    if op == "map":
        fd = cmd["fd"]
        os.ftruncate(fd, cmd["size"])
        maps[fd] = mmap.mmap(fd, cmd["size"], mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        return True
    if op == "mapwrite":
        m = maps[cmd["fd"]]
        data = bytes.fromhex(cmd["hex"])
        m[cmd["off"] : cmd["off"] + len(data)] = data
        if cmd.get("sync", True):
            m.flush()
        return True
    if op == "write":
        return os.pwrite(cmd["fd"], bytes.fromhex(cmd["hex"]), cmd.get("off", 0))
    if op == "fill":  # write chunks until an error; return (bytes written, errno)
        total = 0
        chunk = b"x" * cmd["chunk"]
        try:
            while total < cmd["max"]:
                total += os.write(cmd["fd"], chunk)
        except OSError as e:
            return [total, errno.errorcode[e.errno]]
        return [total, None]
    if op == "truncate":
        os.ftruncate(cmd["fd"], cmd["size"])
        return True
    if op == "seal":
        fuse_payload.seal(cmd["fd"])
        return True
    if op == "cookie":
        return fuse_payload.cookie(cmd["fd"])
    if op == "setxattr":
        os.setxattr(cmd["fd"], cmd["name"], b"")
        return True
    if op == "read":
        return os.pread(cmd["fd"], cmd["size"], cmd.get("off", 0)).hex()
    if op == "close":
        m = maps.pop(cmd["fd"], None)
        if m is not None:
            m.close()
        os.close(fds.pop(cmd["fd"]))
        return True
    if op == "open":
        fd = os.open(cmd["path"], cmd.get("flags", os.O_RDONLY))
        os.close(fd)
        return True
    if op == "stat":
        st = os.stat(cmd["path"])
        return [st.st_uid, st.st_mode]
    if op == "listdir":
        return os.listdir(cmd["path"])
    if op == "unlink":
        os.unlink(cmd["path"])
        return True
    if op == "rename":
        os.rename(cmd["src"], cmd["dst"])
        return True
    if op == "mkdir":
        os.mkdir(cmd["path"])
        return True
    if op == "symlink":
        os.symlink("/etc/passwd", cmd["path"])
        return True
    if op == "mknod":
        os.mkfifo(cmd["path"])
        return True
    if op == "link":
        os.link(cmd["src"], cmd["dst"])
        return True
    if op == "many":  # open many files and never seal them
        made = 0
        try:
            for i in range(cmd["n"]):
                fd = os.open(
                    os.path.join(cmd["mount"], "tmp", f"{cmd['prefix']}{i}"), os.O_RDWR | os.O_CREAT | os.O_EXCL
                )
                os.write(fd, b"y" * cmd.get("size", 0))
                os.close(fd)  # closed but never sealed nor unlinked
                made += 1
        except OSError as e:
            return [made, errno.errorcode[e.errno]]
        return [made, None]
    if op == "recvfd":  # fd arrives on the inherited socket (its number is argv[1])
        sock = socket.socket(fileno=int(sys.argv[1]))
        _, got, _, _ = socket.recv_fds(sock, 16, 1)
        sock.detach()
        fd = got[0]
        received.append(fd)
        data = b""
        while chunk := os.pread(fd, 1 << 20, len(data)):
            data += chunk
        out = {
            "sha": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "uid": os.fstat(fd).st_uid,
            "mode": os.fstat(fd).st_mode & 0o7777,
        }
        for name, attempt in (
            ("write", lambda: os.write(fd, b"z")),
            ("mmap_write", lambda: mmap.mmap(fd, 1, mmap.MAP_SHARED, mmap.PROT_WRITE)),
            ("reopen_rw", lambda: os.open(f"/proc/self/fd/{fd}", os.O_RDWR)),
            ("truncate", lambda: os.ftruncate(fd, 0)),
            ("setxattr", lambda: os.setxattr(fd, "user.sealbus.seal", b"")),
        ):
            try:
                attempt()
                out[name] = "allowed"
            except OSError as e:
                out[name] = errno.errorcode[e.errno]
        return out
    raise ValueError(op)


def main() -> None:
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            reply = {"ok": do(cmd)}
        except OSError as e:
            reply = {"errno": errno.errorcode.get(e.errno, str(e.errno))}
        except Exception as e:
            reply = {"exc": repr(e)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
