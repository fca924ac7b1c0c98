"""The SASL server state machine, line by line."""

import pytest

from broker.wire.errors import SaslError
from broker.wire.sasl import MAX_ATTEMPTS, MAX_LINE, SaslServer

GUID = "0123456789abcdef0123456789abcdef"


def hexuid(uid: int) -> str:
    return str(uid).encode().hex()


def test_external_ok_and_leftover():
    s = SaslServer(1000, GUID)
    out = s.feed(b"\0AUTH EXTERNAL " + hexuid(1000).encode() + b"\r\nNEGOTIATE_UNIX_FD\r\nBEGIN\r\nlXYZ")
    assert out == f"OK {GUID}\r\nAGREE_UNIX_FD\r\n".encode()
    assert s.done and s.unix_fd and s.leftover == b"lXYZ"


def test_wrong_uid_rejected():
    s = SaslServer(1000, GUID)
    assert s.feed(b"\0AUTH EXTERNAL " + hexuid(0).encode() + b"\r\n") == b"REJECTED EXTERNAL\r\n"
    assert not s.done


def test_leading_nul_required():
    with pytest.raises(SaslError):
        SaslServer(0, GUID).feed(b"AUTH EXTERNAL 30\r\n")


def test_external_then_data():
    s = SaslServer(5, GUID)
    assert s.feed(b"\0AUTH EXTERNAL\r\n") == b"DATA\r\n"
    assert s.feed(b"DATA " + hexuid(5).encode() + b"\r\n") == f"OK {GUID}\r\n".encode()
    s2 = SaslServer(5, GUID)
    s2.feed(b"\0AUTH EXTERNAL\r\n")
    assert s2.feed(b"DATA\r\n") == f"OK {GUID}\r\n".encode()  # empty response: use the credentials


def test_other_mechanism_and_empty_auth_rejected():
    s = SaslServer(0, GUID)
    assert s.feed(b"\0AUTH DBUS_COOKIE_SHA1 abc\r\n") == b"REJECTED EXTERNAL\r\n"
    assert s.feed(b"AUTH\r\n") == b"REJECTED EXTERNAL\r\n"


def test_cancel_and_error_reject():
    s = SaslServer(0, GUID)
    s.feed(b"\0AUTH EXTERNAL\r\n")
    assert s.feed(b"CANCEL\r\n") == b"REJECTED EXTERNAL\r\n"
    s.feed(b"AUTH EXTERNAL 30\r\n")
    assert s.feed(b"ERROR\r\n") == b"REJECTED EXTERNAL\r\n"


def test_begin_before_auth_disconnects():
    with pytest.raises(SaslError):
        SaslServer(0, GUID).feed(b"\0BEGIN\r\n")


def test_negotiate_unix_fd_refused_when_unsupported():
    s = SaslServer(0, GUID, unix_fd_supported=False)
    out = s.feed(b"\0AUTH EXTERNAL 30\r\nNEGOTIATE_UNIX_FD\r\n")
    assert out.endswith(b"\r\n") and b"ERROR" in out.split(b"\r\n")[1]
    assert not s.unix_fd


def test_unknown_command_error():
    s = SaslServer(0, GUID)
    assert s.feed(b"\0HELLO\r\n").startswith(b"ERROR")


def test_line_length_limit():
    with pytest.raises(SaslError):
        SaslServer(0, GUID).feed(b"\0" + b"A" * (MAX_LINE + 10))


def test_attempt_limit():
    s = SaslServer(1, GUID)
    s.feed(b"\0")
    with pytest.raises(SaslError):
        for _ in range(MAX_ATTEMPTS + 2):
            s.feed(b"AUTH EXTERNAL 30\r\n")
