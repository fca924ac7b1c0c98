"""D-Bus server addresses: parse ``unix:...`` forms and make listening sockets.

Supports every unix form dbus-daemon listens on (path, abstract, tmpdir, dir,
runtime=yes) and sockets passed by systemd socket activation (LISTEN_FDS).
"""

import os
import secrets
import socket
import stat
from dataclasses import dataclass
from urllib.parse import quote, unquote

SD_LISTEN_FDS_START = 3


class AddressError(ValueError):
    pass


@dataclass
class Listener:
    sock: socket.socket
    address: str  # the connectable address (without guid)
    path: str | None = None  # filesystem socket to unlink on exit
    inode: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket file we bound

    def close(self) -> None:
        self.sock.close()
        if self.path:
            try:
                st = os.lstat(self.path)
                # only our own socket: another bus may have re-bound the path since
                if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self.inode:
                    os.unlink(self.path)
            except OSError:
                pass


def parse_address(address: str) -> list[tuple[str, dict[str, str]]]:
    out = []
    for part in address.split(";"):
        if not part:
            continue
        transport, sep, rest = part.partition(":")
        if not sep:
            raise AddressError(f"address {part!r} has no transport")
        kv = {}
        for item in rest.split(","):
            if not item:
                continue
            k, eq, v = item.partition("=")
            if not eq:
                raise AddressError(f"address {part!r}: {item!r} is not key=value")
            if k in kv:
                raise AddressError(f"address {part!r}: key {k!r} repeated")
            kv[k] = unquote(v)
        out.append((transport, kv))
    if not out:
        raise AddressError("empty address")
    return out


def escape(value: str) -> str:
    return quote(value, safe="-_/.\\*0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _bind_path(path: str, mode: int = 0o666) -> Listener:
    try:
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode):
            os.unlink(path)  # a stale socket from an earlier run
        else:
            raise AddressError(f"{path} exists and is not a socket")
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.bind(path)
    os.chmod(path, mode)
    s.listen(128)
    st = os.lstat(path)
    return Listener(s, f"unix:path={escape(path)}", path, (st.st_dev, st.st_ino))


def _bind_abstract(name: str) -> Listener:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.bind("\0" + name)
    s.listen(128)
    return Listener(s, f"unix:abstract={escape(name)}")


def listen(address: str, *, socket_mode: int = 0o666) -> Listener:
    """Listen on the first usable entry of a (possibly ;-separated) address."""
    errors = []
    for transport, kv in parse_address(address):
        try:
            return _listen_one(transport, kv, socket_mode)
        except (AddressError, OSError) as e:
            errors.append(f"{transport}: {e}")
    raise AddressError("cannot listen on " + address + ": " + "; ".join(errors))


def _listen_one(transport: str, kv: dict[str, str], socket_mode: int) -> Listener:
    if transport == "systemd":
        got = systemd_listeners()
        if not got:
            raise AddressError("systemd: no LISTEN_FDS were passed")
        return got[0]
    if transport != "unix":
        raise AddressError(f"unsupported transport {transport!r} (only unix is offered)")
    keys = set(kv) - {"guid"}
    if len(keys) != 1:
        raise AddressError(f"unix address needs exactly one of path/abstract/tmpdir/dir/runtime, got {sorted(keys)}")
    (key,) = keys
    value = kv[key]
    if key == "path":
        return _bind_path(value, socket_mode)
    if key == "abstract":
        return _bind_abstract(value)
    if key in ("tmpdir", "dir"):
        # tmpdir: as dbus-daemon >= 1.14 (which no longer uses an abstract socket for it), a socket file
        # with a random name in that directory, i.e. the same as dir
        return _bind_path(os.path.join(value, "dbus-" + secrets.token_hex(5)), socket_mode)
    if key == "runtime":
        if value != "yes":
            raise AddressError("unix:runtime only accepts 'yes'")
        rt = os.environ.get("XDG_RUNTIME_DIR")
        if not rt:
            raise AddressError("unix:runtime=yes needs XDG_RUNTIME_DIR")
        return _bind_path(os.path.join(rt, "bus"), 0o600)
    raise AddressError(f"unknown unix address key {key!r}")


def systemd_listeners() -> list[Listener]:
    """Sockets inherited through systemd socket activation (LISTEN_PID/LISTEN_FDS)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    n = int(os.environ.get("LISTEN_FDS", "0"))
    out = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n):
        s = socket.socket(fileno=fd)
        if s.family != socket.AF_UNIX or s.type != socket.SOCK_STREAM:
            raise AddressError(f"inherited fd {fd} is not a unix stream socket")
        os.set_inheritable(fd, False)
        name = s.getsockname()
        if isinstance(name, bytes) and name.startswith(b"\0"):
            addr = f"unix:abstract={escape(name[1:].decode())}"
        else:
            addr = f"unix:path={escape(name)}"
        out.append(Listener(s, addr))
    for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(k, None)
    return out


def default_session_address() -> str:
    """The embedded default: a socket under $XDG_RUNTIME_DIR or a private temp dir."""
    import tempfile

    rt = os.environ.get("XDG_RUNTIME_DIR")
    if rt and os.path.isdir(rt) and os.access(rt, os.W_OK):
        d = os.path.join(rt, "sealbus")
        os.makedirs(d, mode=0o700, exist_ok=True)
    else:
        d = tempfile.mkdtemp(prefix="sealbus-")
    return f"unix:path={os.path.join(d, f'bus-{os.getpid()}')}"
