"""Log lines of the launcher and the broker: one format on stderr, or structured entries in the journal.

Under systemd (stderr is the journal stream: ``$JOURNAL_STREAM`` names its
device and inode) each record goes to journald over its native protocol
instead, with PRIORITY, the logger, and the fields a call site attached
(``bus.log_fields``: MESSAGE_ID, SEALBUS_PEER_UID, ...), so that
``journalctl -u sealbus MESSAGE_ID=...`` works. The socket is made and
connected when logging is set up, before the broker's sandbox (which allows
neither socket() nor connect()). ``$SEALBUS_JOURNAL_SOCKET`` points it at
another datagram socket (tests). A record the journal does not take goes to
stderr.
"""

import logging
import os
import socket
import struct
import sys

JOURNAL_SOCKET = "/run/systemd/journal/socket"
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}
_MAX_FIELD = 48 * 1024  # keeps a record within one datagram (journald's limit is far above)


def _line_format() -> logging.Formatter:
    return logging.Formatter(f"sealbus[{os.getpid()}] %(levelname)s %(name)s: %(message)s")


def journal_fields(record: logging.LogRecord, text: str) -> bytes:
    """One record in journald's native format: KEY=value lines, or KEY, a 64-bit length and raw bytes
    for a value with a newline."""
    fields = {
        "MESSAGE": text,
        "PRIORITY": str(_PRIORITY.get(record.levelno, 6)),
        "SYSLOG_IDENTIFIER": "sealbus",
        "SYSLOG_PID": str(os.getpid()),
        "SEALBUS_LOGGER": record.name,
        "CODE_FILE": record.pathname,
        "CODE_LINE": str(record.lineno),
        "CODE_FUNC": record.funcName,
        **getattr(record, "journal", {}),
    }
    out = bytearray()
    for key, value in fields.items():
        raw = str(value).encode("utf-8", "replace")[:_MAX_FIELD]
        if b"\n" in raw:
            out += key.encode() + b"\n" + struct.pack("<Q", len(raw)) + raw + b"\n"
        else:
            out += key.encode() + b"=" + raw + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """Sends each record as one datagram to journald (or the test's socket); stderr if that fails."""

    def __init__(self, path: str):
        super().__init__()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.connect(path)
        self.sock.setblocking(False)  # a journal that lags costs a line on stderr, never a stalled loop
        self.fallback = _line_format()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            self.sock.send(journal_fields(record, text))
        except OSError:
            sys.stderr.write(self.fallback.format(record) + "\n")
        except Exception:
            self.handleError(record)


def journal_socket() -> str | None:
    """Where to send structured records: $SEALBUS_JOURNAL_SOCKET, or journald when stderr is its stream."""
    override = os.environ.get("SEALBUS_JOURNAL_SOCKET")
    if override:
        return override
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return None
    return JOURNAL_SOCKET if (st.st_dev, st.st_ino) == (dev, ino) else None


def setup_logging(level: str = "info") -> None:
    handler: logging.Handler | None = None
    path = journal_socket()
    if path:
        try:
            handler = JournalHandler(path)
        except OSError:
            handler = None  # no journal to reach: plain lines on stderr (which systemd still collects)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_line_format())
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
