"""``sealbus send | receive | cat-payload``: the zero-copy path at a shell."""

import argparse
import hashlib
import os
import sys
import time

from jeepney import DBusAddress, MatchRule, MessageType, message_bus, new_method_call, new_method_return, new_signal
from jeepney.io.blocking import open_dbus_connection

from ..payload.seals import get_seals, seal_names
from .memfd import PayloadError, open_payload
from .payload import make_payload, open_trusted, snapshot_devices, trusted_kind


def _progress(total_size: int, force: bool = False):
    """A progress callback writing to stderr for large files (>= 16 MiB on a terminal, or when forced)."""
    if not force and (total_size < 16 << 20 or not sys.stderr.isatty()):
        return None
    start = time.monotonic()

    def show(done: int) -> None:
        pct = done * 100 // max(total_size, 1)
        sys.stderr.write(f"\rsealing {done >> 20}/{total_size >> 20} MiB ({pct}%) {time.monotonic() - start:.1f}s")
        if done >= total_size:
            sys.stderr.write("\n")

    return show


def make_payload_fd(path: str, via: str, conn=None, progress: bool = False, mount: str | None = None):
    """(fd, transport) for the file at path: see broker.client.payload.make_payload."""
    size = os.stat(path).st_size
    return make_payload(path, conn, via=via, mount=mount, progress=_progress(size, progress))


class CliError(Exception):
    """What a user did wrong or must fix: printed as one line, exit status 1."""


def connect(address: str):
    """A connection to the bus at address, or a CliError saying what is wrong with it."""
    try:
        return open_dbus_connection(address, enable_fds=True)
    except ValueError:  # jeepney: an address it cannot parse
        raise CliError(f"bad --address {address!r}: use the address `sealbus run` prints, "
                       "e.g. unix:path=/tmp/sealbus.sock") from None  # fmt: skip
    except RuntimeError as e:  # jeepney: a transport it does not speak (tcp:, ...)
        raise CliError(f"bad --address {address!r}: {e}") from None
    except OSError as e:
        raise CliError(f"cannot connect to {address}: {e.strerror or e} (is the bus running? `sealbus run "
                       "--address ...` starts one and prints its address)") from None  # fmt: skip


def _readable_file(path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise CliError(f"--payload {path}: {e.strerror or e}") from None


def cmd_send(args) -> int:
    _readable_file(args.payload)
    conn = connect(args.address)
    fd = -1
    try:
        fd, transport = make_payload_fd(args.payload, args.via, conn, args.progress, args.payload_fs)
        st = os.fstat(fd)
        size = st.st_size
        # the receivers' fds refer to this very inode: nothing is copied on the way
        print(f"payload: size={size} dev={st.st_dev} ino={st.st_ino} via={transport}", flush=True)
        if args.signal:
            msg = new_signal(DBusAddress(args.path, interface=args.interface), args.member, "h", (fd,))
            conn.send(msg)
            print(f"sent signal {args.interface}.{args.member} with a {size}-byte sealed payload")
            return 0
        addr = DBusAddress(args.path, bus_name=args.dest, interface=args.interface)
        reply = conn.send_and_get_reply(new_method_call(addr, args.member, "h", (fd,)), timeout=args.timeout)
        if reply.header.message_type == MessageType.error:
            print(f"sealbus send: {reply.header.fields.get(4)}: {reply.body[0] if reply.body else ''}",
                  file=sys.stderr)  # fmt: skip
            return 1
        print(f"sent {size} bytes to {args.dest} as a sealed payload; reply: {reply.body}")
        return 0
    finally:
        conn.close()
        if fd >= 0:
            os.close(fd)


def describe_payload(fd: int, allow_unsealed: bool = False, snapshot_devs=frozenset()) -> str:
    st = os.fstat(fd)
    seals = get_seals(fd)
    try:
        view, kind = open_trusted(fd, snapshot_devs)
    except PayloadError:
        if not allow_unsealed:
            raise
        view, kind = open_payload(fd, allow_unsealed=True), "untrusted"
    digest = hashlib.sha256(view).hexdigest()
    return (f"size={st.st_size} kind={kind} seals={seal_names(seals) if seals is not None else 'n/a'} "
            f"sha256={digest} dev={st.st_dev} ino={st.st_ino}")  # fmt: skip


def save_payload(fd: int, out_dir: str, n: int) -> str:
    """Copy a payload into OUT_DIR/payload-N.bin inside the kernel (no copy in this process)."""
    path = os.path.join(out_dir, f"payload-{n}.bin")
    size = os.fstat(fd).st_size
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        off = 0
        while off < size:
            sent = os.sendfile(out, fd, off, size - off)
            if sent == 0:
                break
            off += sent
    finally:
        os.close(out)
    return path


def cmd_receive(args) -> int:
    if args.out and not os.path.isdir(args.out):
        raise CliError(f"--out {args.out} is not a directory: create it first (mkdir -p {args.out})")
    conn = connect(args.address)
    if args.name:
        reply = conn.send_and_get_reply(message_bus.RequestName(args.name))
        if reply.body[0] != 1:
            print(f"sealbus receive: could not become primary owner of {args.name}", file=sys.stderr)
            return 1
    if args.signal_interface:
        conn.send_and_get_reply(message_bus.AddMatch(MatchRule(type="signal", interface=args.signal_interface)))
    snapshot_devs = snapshot_devices(conn)
    print(f"listening as {conn.unique_name}", flush=True)
    seen = 0
    while args.count == 0 or seen < args.count:
        msg = conn.receive()
        fds = [a for a in msg.body if hasattr(a, "to_raw_fd")] if msg.body else []
        if not fds:
            continue
        seen += 1
        for f in fds:
            raw = f.to_raw_fd()
            try:
                print(f"payload {seen}: {describe_payload(raw, args.allow_unsealed, snapshot_devs)}", flush=True)
                if args.out:
                    print(f"payload {seen}: saved to {save_payload(raw, args.out, seen)}", flush=True)
            except PayloadError as e:
                print(f"payload {seen}: refused: {e}", flush=True)
            finally:
                os.close(raw)
        if msg.header.message_type == MessageType.method_call:
            conn.send(new_method_return(msg))
    conn.close()
    return 0


def cmd_cat(args) -> int:
    if args.path:
        try:
            fd = os.open(args.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise CliError(f"{args.path}: {e.strerror or e}") from None
    else:
        fd = args.fd if args.fd is not None else 0  # default: the payload fd is our stdin
    try:
        if not args.allow_unsealed:
            trusted_kind(fd)
        view = open_payload(fd, allow_unsealed=True)
        out = sys.stdout.buffer
        for i in range(0, len(view), 1 << 20):
            out.write(view[i : i + (1 << 20)])
        out.flush()
    except PayloadError as e:
        print(f"sealbus cat-payload: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="sealbus",
        description="Sealed payloads through a bus: 'send' seals a file into a memfd (F_SEAL_SHRINK|GROW|WRITE|"
        "SEAL) and passes it as an 'h' argument; 'receive' shows what arrives (size, seals, sha256, inode: the "
        "same inode as the sender's memfd, i.e. nothing was copied); 'cat-payload' prints a payload's bytes.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("send", help="send FILE as a sealed memfd (or payload-fs snapshot) in an 'h' argument")
    s.add_argument("--address", required=True)
    s.add_argument("--dest", help="destination bus name (method call)")
    s.add_argument("--path", default="/")
    s.add_argument("--interface", required=True)
    s.add_argument("--member", required=True)
    s.add_argument("--payload", required=True, metavar="FILE")
    s.add_argument("--signal", action="store_true", help="broadcast a signal instead of calling a method")
    s.add_argument("--via", choices=["auto", "memfd", "fuse"], default="auto",
                   help="auto (default): a sealed memfd where the kernel can seal one, else the FUSE payload "
                        "filesystem; memfd or fuse to force one")  # fmt: skip
    s.add_argument("--payload-fs", metavar="DIR", help="with --via fuse: where the payload fs is mounted "
                   "(default: found in /proc/self/mountinfo)")  # fmt: skip
    s.add_argument("--timeout", type=float, default=60)
    s.add_argument("--progress", action="store_true", help="show sealing progress on stderr even when it is "
                   "not a terminal (shown by default for files >= 16 MiB on a terminal)")  # fmt: skip
    r = sub.add_parser("receive", help="print size, seals, sha256 and inode of payloads received")
    r.add_argument("--address", required=True)
    r.add_argument("--name", help="own this name and answer method calls")
    r.add_argument("--signal-interface", help="also receive broadcast signals of this interface")
    r.add_argument("--count", type=int, default=0, help="stop after N payloads (0: never)")
    r.add_argument("--out", metavar="DIR", help="also save each payload as DIR/payload-N.bin")
    r.add_argument("--allow-unsealed", action="store_true", help="show payloads lacking the four seals too")
    c = sub.add_parser("cat-payload", help="write a payload's bytes to stdout (checks seals); the payload is "
                       "PATH, --fd N, or else stdin (e.g. `sealbus cat-payload < /proc/PID/fd/N`)")  # fmt: skip
    c.add_argument("path", nargs="?", help="a file to open (e.g. /proc/PID/fd/N)")
    c.add_argument("--fd", type=int, help="an inherited fd number (default 0: stdin)")
    c.add_argument("--allow-unsealed", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "send" and not args.signal and not args.dest:
        p.error("send needs --dest (or --signal)")
    run = {"send": cmd_send, "receive": cmd_receive}.get(args.cmd, cmd_cat)
    try:
        return run(args)
    except KeyboardInterrupt:  # Ctrl-C is how an idle `receive` stops: quietly, with the shell's code
        return 130
    except CliError as e:
        print(f"sealbus {args.cmd}: {e}", file=sys.stderr)
        return 1
    except PayloadError as e:
        print(f"sealbus {args.cmd}: {e}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"sealbus {args.cmd}: no reply within --timeout {args.timeout:g} s", file=sys.stderr)
        return 1
    except OSError as e:  # the bus went away, a file that changed under us
        print(f"sealbus {args.cmd}: {e.strerror or e}", file=sys.stderr)
        return 1
