"""Logs a sysadmin can use: one journal entry per denial, authentication failure, limit hit and
disconnect, with the peer's uid, pid, label and unique name as fields.

journald does not run here, so the bus is pointed ($SEALBUS_JOURNAL_SOCKET) at a datagram socket the
test binds, and the test decodes what arrives with its own reading of journald's native protocol
(KEY=value lines; KEY, a little-endian 64-bit length and raw bytes for values with a newline)."""

import os
import socket
import struct
import subprocess
import sys

import pytest
from jeepney import DBusAddress, MatchRule, message_bus, new_method_call
from jeepney.io.blocking import open_dbus_connection

from broker.launch.logs import JOURNAL_SOCKET

from .conftest import SEALBUS, terminate

# The ids are an interface (journalctl MESSAGE_ID=...): pinned here, not imported.
DENIED = "2cf3df2aa08a48d4ac45650c28aa2efc"
AUTH_FAILED = "231538a553a348a6b3128dc88e436220"
LIMIT = "624aa40e23a84def8c0b8fb6d4635d71"
DISCONNECTED = "605dcf94b19442e694d05e436640f8a4"
CONNECTED = "f4052d943003484a984972d150f264f7"

CONFIG = """<busconfig><type>session</type>
  <limit name="max_match_rules_per_connection">2</limit>
  <policy context="default"><allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/>
  <allow own="*"/><deny send_interface="org.sealbus.Forbidden"/></policy></busconfig>"""


def parse_entry(data: bytes) -> dict[str, str]:
    fields, i = {}, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            i = nl + 1
        else:
            key, (size,) = line, struct.unpack("<Q", data[nl + 1 : nl + 9])
            value = data[nl + 9 : nl + 9 + size]
            assert data[nl + 9 + size : nl + 10 + size] == b"\n"
            i = nl + 10 + size
        fields[key.decode()] = value.decode()
    return fields


@pytest.fixture
def journal(tmp_path):
    """A datagram socket standing in for /run/systemd/journal/socket."""
    path = str(tmp_path / "journal.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    yield path, sock
    sock.close()


def entries_until(sock, want) -> list[dict]:
    """Entries as they arrive, until one satisfies want (else the socket's timeout fails the test)."""
    got = []
    while not any(want(e) for e in got):
        got.append(parse_entry(sock.recv(1 << 16)))
    return got


def the(entries, message_id, **fields) -> dict:
    hits = [e for e in entries if e.get("MESSAGE_ID") == message_id and all(e.get(k) == v for k, v in fields.items())]
    assert hits, (message_id, fields, entries)
    return hits[0]


def test_denial_auth_failure_limit_and_disconnect_reach_the_journal_with_peer_fields(journal, tmp_path):
    path, jsock = journal
    conf = tmp_path / "bus.conf"
    conf.write_text(CONFIG)
    bus_sock = tmp_path / "bus"
    err = open(tmp_path / "stderr", "w+")
    bus = subprocess.Popen([SEALBUS, "run", "--address", f"unix:path={bus_sock}", "--config", str(conf)],
                           stdout=subprocess.PIPE, stderr=err, text=True,
                           env={**os.environ, "SEALBUS_JOURNAL_SOCKET": path})  # fmt: skip
    try:
        address = bus.stdout.readline().strip()
        assert address, (tmp_path / "stderr").read_text()
        me = str(os.getuid())
        c = open_dbus_connection(address)
        name = c.unique_name
        e = entries_until(jsock, lambda e: e.get("MESSAGE_ID") == CONNECTED)
        hello = the(e, CONNECTED, SEALBUS_UNIQUE_NAME=name)
        assert (hello["SEALBUS_PEER_UID"], hello["SEALBUS_PEER_PID"], hello["PRIORITY"]) == (me, str(os.getpid()), "6")
        assert hello["SEALBUS_PEER_LABEL"] and hello["SYSLOG_IDENTIFIER"] == "sealbus"

        # a policy denial
        c.send_and_get_reply(new_method_call(DBusAddress("/", name, "org.sealbus.Forbidden"), "Nope"))
        e = entries_until(jsock, lambda e: e.get("MESSAGE_ID") == DENIED)
        denied = the(e, DENIED, SEALBUS_UNIQUE_NAME=name, SEALBUS_INTERFACE="org.sealbus.Forbidden")
        assert (denied["SEALBUS_PEER_UID"], denied["SEALBUS_PEER_PID"], denied["PRIORITY"]) == (
            me,
            str(os.getpid()),
            "4",
        )
        assert denied["SEALBUS_DENIED"] == "send" and "Rejected send message" in denied["MESSAGE"]

        # a limit: the third match rule
        for i in range(3):
            c.send_and_get_reply(message_bus.AddMatch(MatchRule(type="signal", member=f"M{i}")))
        limit = the(entries_until(jsock, lambda e: e.get("MESSAGE_ID") == LIMIT), LIMIT, SEALBUS_UNIQUE_NAME=name)
        assert limit["SEALBUS_LIMIT"] == "max_match_rules_per_connection" and limit["SEALBUS_PEER_UID"] == me

        # an authentication failure, from another process (its pid is the one reported)
        code = (f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({str(bus_sock)!r}); "
                "s.sendall(b'X'); s.recv(1); print(0)")  # fmt: skip
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        assert child.returncode == 0, child.stderr
        auth = the(entries_until(jsock, lambda e: e.get("MESSAGE_ID") == AUTH_FAILED), AUTH_FAILED)
        assert auth["SEALBUS_PEER_UID"] == me and auth["SEALBUS_PEER_PID"] not in ("0", str(os.getpid()))
        assert "the first byte must be NUL" in auth["MESSAGE"]

        # a disconnect
        c.close()
        e = entries_until(jsock, lambda e: e.get("MESSAGE_ID") == DISCONNECTED)
        gone = the(e, DISCONNECTED, SEALBUS_UNIQUE_NAME=name)
        assert gone["SEALBUS_PEER_PID"] == str(os.getpid()) and gone["SEALBUS_EVENT"] == "disconnected"
    finally:
        terminate(bus, timeout=10)
    # all of it went to the journal, none of it to stderr as well
    assert "denied send" not in (tmp_path / "stderr").read_text()


def test_journal_is_used_only_when_stderr_is_the_journal_stream(tmp_path):
    """$JOURNAL_STREAM is what systemd sets when it connects stderr to journald: honoured only when it names
    the stderr this process really has (a child of a service inherits the variable, not the stream)."""
    code = "from broker.launch.logs import journal_socket; print(journal_socket())"
    log = tmp_path / "stderr"
    log.write_text("")
    st = os.stat(log)
    env = {k: v for k, v in os.environ.items() if k != "SEALBUS_JOURNAL_SOCKET"}
    for stream, expect in ((f"{st.st_dev}:{st.st_ino}", JOURNAL_SOCKET), (f"{st.st_dev}:{st.st_ino + 1}", "None"),
                           ("garbage", "None")):  # fmt: skip
        with open(log, "a") as err:
            out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=err, text=True,
                                 env={**env, "JOURNAL_STREAM": stream}, timeout=30)  # fmt: skip
        assert out.stdout.strip() == expect, (stream, out.stdout)


def test_unreachable_journal_falls_back_to_lines_on_stderr(tmp_path):
    """No journal at the address: the plain `sealbus[PID] LEVEL logger: text` lines on stderr, as before."""
    code = ("import logging; from broker.launch.logs import setup_logging; setup_logging('info'); "
            "logging.getLogger('sealbus.test').warning('hello %s', 'there')")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "SEALBUS_JOURNAL_SOCKET": str(tmp_path / "nobody")})  # fmt: skip
    assert out.returncode == 0 and "WARNING sealbus.test: hello there" in out.stderr, out.stderr


def test_client_text_with_newlines_stays_inside_its_field():
    """A value a client controls (a member name in a denial, an error text) that holds a newline and a
    forged KEY=value is sent length-prefixed: it cannot add or replace a field of the entry."""
    import logging

    from broker.launch.logs import journal_fields

    rec = logging.LogRecord("sealbus.policy", logging.WARNING, __file__, 1, "denied %s", ("x\nMESSAGE_ID=0",), None)
    rec.journal = {"MESSAGE_ID": DENIED, "SEALBUS_MEMBER": "a\nSEALBUS_PEER_UID=0\n"}
    entry = parse_entry(journal_fields(rec, rec.getMessage()))
    assert entry["MESSAGE"] == "denied x\nMESSAGE_ID=0" and entry["MESSAGE_ID"] == DENIED
    assert entry["SEALBUS_MEMBER"] == "a\nSEALBUS_PEER_UID=0\n" and "SEALBUS_PEER_UID" not in entry


def test_a_journal_that_does_not_read_never_blocks_the_logger(journal):
    """The journal's socket fills up (nobody reads it): records go to stderr instead, and logging returns."""
    path, _unread = journal
    code = ("import logging; from broker.launch.logs import setup_logging; setup_logging('info'); "
            "log = logging.getLogger('sealbus.test')\nfor i in range(5000): log.warning('line %d', i)\n"
            "print('done')")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "SEALBUS_JOURNAL_SOCKET": path})  # fmt: skip
    assert out.stdout.strip() == "done", out.stderr[-2000:]
    assert "WARNING sealbus.test: line 4999" in out.stderr
