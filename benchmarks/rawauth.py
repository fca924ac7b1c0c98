"""The SASL side of a bare-socket D-Bus client, shared by the benchmark clients and tests/conftest.py."""

import socket


def read_line(sock: socket.socket) -> bytes:
    """One authentication line from the bus, ``\\r\\n`` included; ConnectionError if the bus closes first."""
    line = b""
    while not line.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("bus closed the connection during authentication")
        line += chunk
    return line
