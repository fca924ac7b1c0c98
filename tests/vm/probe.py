"""One action, run by the enforcing tier inside a demo domain (runcon -t ...).

Prints 'OK <detail>' and exits 0, or 'ERR <errno name>' and exits 1, so the
tier can tell an SELinux EACCES from any other failure. The file actions are
stdlib only; the D-Bus actions (own, call, serve) use jeepney from the venv
(usr_t, which every demo domain may read) and print 'DBUSERR <error name>
<text>' and exit 2 when the bus answers with an error.
"""

import errno
import os
import socket
import sys
import time


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


# -- D-Bus actions ------------------------------------------------------------------------------

DBUS_TIMEOUT = 60  # a TCG guest is slow
DEMO_PATH = "/org/sealbus/Demo"
DEMO_IFACE = "org.sealbus.Demo"


class DBusError(Exception):
    def __init__(self, name: str, text: str):
        super().__init__(f"{name} {text}")


def _bus(address: str, enable_fds: bool = False):
    from jeepney.io.blocking import open_dbus_connection

    return open_dbus_connection(address, enable_fds=enable_fds, auth_timeout=DBUS_TIMEOUT)  # says Hello


def _unwrap(reply):
    from jeepney import HeaderFields, MessageType

    if reply.header.message_type == MessageType.error:
        name = reply.header.fields.get(HeaderFields.error_name, "?")
        raise DBusError(name, str(reply.body[0]) if reply.body else "")
    return reply.body


def _request_name(conn, name: str) -> str:
    from jeepney.bus_messages import message_bus

    (code,) = _unwrap(conn.send_and_get_reply(message_bus.RequestName(name, 4), timeout=DBUS_TIMEOUT))
    if code != 1:  # DBUS_REQUEST_NAME_REPLY_PRIMARY_OWNER (flags: DO_NOT_QUEUE)
        raise DBusError("RequestNameReply", f"{name}: reply {code}, not primary owner")
    return f"{conn.unique_name} owns {name}"


def own(address: str, name: str) -> str:
    with _bus(address) as conn:
        return _request_name(conn, name)


def call(address: str, dest: str) -> str:
    from jeepney import DBusAddress, new_method_call

    with _bus(address) as conn:
        msg = new_method_call(
            DBusAddress(DEMO_PATH, bus_name=dest, interface=DEMO_IFACE), "Ping", "s", (conn.unique_name,)
        )
        body = _unwrap(conn.send_and_get_reply(msg, timeout=DBUS_TIMEOUT))
        return f"{conn.unique_name} -> {dest}: {body[0]}"


def whoami(address: str) -> str:
    """The label the bus reports for this connection, both ways (SELinux context and credentials)."""
    from jeepney.bus_messages import message_bus

    with _bus(address) as conn:
        (ctx,) = _unwrap(conn.send_and_get_reply(message_bus.GetConnectionSELinuxSecurityContext(conn.unique_name),
                                                 timeout=DBUS_TIMEOUT))  # fmt: skip
        (creds,) = _unwrap(conn.send_and_get_reply(message_bus.GetConnectionCredentials(conn.unique_name),
                                                   timeout=DBUS_TIMEOUT))  # fmt: skip
        label = bytes(creds.get("LinuxSecurityLabel", ("ay", b""))[1]).rstrip(b"\0").decode()
        context = bytes(ctx).rstrip(b"\0").decode()
        return f"context={context} credentials={label}"


def serve(address: str, names: str) -> str:
    """Own each name (comma separated; one line each: 'OWN name OK|DBUSERR ...'), print 'READY unique',
    then answer every method call (printing 'CALL sender member') until stdin closes."""
    import select

    from jeepney import HeaderFields, MessageType, new_method_return

    with _bus(address, enable_fds=True) as conn:
        for name in names.split(","):
            try:
                print("OWN", name, "OK", _request_name(conn, name), flush=True)
            except DBusError as e:
                print("OWN", name, "DBUSERR", e, flush=True)
        print("READY", conn.unique_name, flush=True)
        try:
            me = open("/proc/self/attr/current").read().strip("\0\n")
        except OSError:
            me = f"pid {os.getpid()}"  # no LSM label (a host without SELinux)
        deadline = time.monotonic() + DBUS_TIMEOUT * 5
        while time.monotonic() < deadline:
            if select.select([sys.stdin], [], [], 0)[0]:
                return "stopped"  # the tier closed our stdin
            try:
                msg = conn.receive(timeout=0.5)
            except TimeoutError:
                continue
            if msg.header.message_type == MessageType.method_call:
                fields = msg.header.fields
                member = fields.get(HeaderFields.member, "?")
                print("CALL", fields.get(HeaderFields.sender, "?"), member, flush=True)
                answer = f"pong from {me}"
                if member == "TakeFd" and msg.body:
                    try:
                        fd = msg.body[0].to_raw_fd()
                        try:  # pread: the sender's writes left the shared file offset at the end
                            answer = f"read {os.pread(fd, 64, 0)!r} from the passed fd, in {me}"
                        finally:
                            os.close(fd)
                    except OSError as e:
                        answer = f"cannot read the passed fd: {e.strerror}"
                conn.send_message(new_method_return(msg, "s", (answer,)))
        return "timed out"


def send_fd(address: str, dest: str, kind: str) -> str:
    """Pass an fd to the service's TakeFd through the real bus: a sealed memfd, a plain file opened
    read-only, or a pipe (which policy lets no broker receive); prints what the service read."""
    from jeepney import DBusAddress, new_method_call

    sys.dont_write_bytecode = True
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    if kind == "memfd":
        from broker.client.memfd import seal

        fd = seal(b"sealed memfd payload")
    elif kind == "file":
        fd = os.open(os.path.abspath(__file__), os.O_RDONLY | os.O_CLOEXEC)  # usr_t: all three may read it
    else:
        fd, w = os.pipe()
        os.write(w, b"pipe bytes")
        os.close(w)
    try:
        with _bus(address, enable_fds=True) as conn:
            msg = new_method_call(DBusAddress(DEMO_PATH, bus_name=dest, interface=DEMO_IFACE), "TakeFd", "h", (fd,))
            try:
                body = _unwrap(conn.send_and_get_reply(msg, timeout=DBUS_TIMEOUT))
            except (ConnectionError, EOFError) as e:
                raise DBusError("Disconnected", f"the bus closed the connection ({e!r})") from None
            return f"{kind}: {body[0]}"
    finally:
        os.close(fd)


def claim(address: str, mount: str) -> str:
    """The whole fallback dance through the real bus: seal on the payload fs, Claim, read the snapshot."""
    sys.dont_write_bytecode = True  # the source tree is read-only to demo domains
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the source
    from broker.client.memfd import PayloadError
    from broker.client.payload import make_payload, snapshot_devices, trusted_kind

    data = os.urandom(100_000)
    with _bus(address, enable_fds=True) as conn:
        try:
            fd, via = make_payload(data, conn, via="fuse", mount=mount)
        except PayloadError as e:
            raise DBusError("PayloadError", str(e)) from None
        try:
            kind = trusted_kind(fd, snapshot_devices(conn))
            same = os.pread(fd, len(data) + 1, 0) == data
            try:
                os.write(fd, b"x")
                writable = "writable!"
            except OSError:
                writable = "read-only"
        finally:
            os.close(fd)
    if not same:
        raise DBusError("Mismatch", "the snapshot does not hold the sealed bytes")
    return f"claimed via {via}: {kind}, identical bytes, {writable}"


ACTIONS = {
    "connect": connect,
    "write-payload": write_payload,
    "read": read_file,
    "list": list_dir,
    "seal-payload": seal_payload,
    "own": own,
    "call": call,
    "serve": serve,
    "claim": claim,
    "send-fd": send_fd,
    "whoami": whoami,
}


def main() -> int:
    action, args = sys.argv[1], sys.argv[2:]
    try:
        print("OK", ACTIONS[action](*args), flush=True)
        return 0
    except OSError as e:
        print("ERR", errno.errorcode.get(e.errno, str(e.errno)), e.strerror)
        return 1
    except DBusError as e:
        print("DBUSERR", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
