"""`sealbus run` as a user starts it: address on the first stdout line, real
clients work, SIGTERM stops it and removes the socket."""

import os
import signal
import subprocess
import sys

import pytest

SEALBUS = os.path.join(os.path.dirname(sys.executable), "sealbus")


@pytest.fixture
def bus(tmp_path):
    path = tmp_path / "bus"
    proc = subprocess.Popen([SEALBUS, "run", "--address", f"unix:path={path}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    address = proc.stdout.readline().strip()
    assert address == f"unix:path={path}", proc.stderr.read() if not address else address
    yield address, path, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_busctl_lists_names(bus):
    address, _, _ = bus
    out = subprocess.run(["busctl", f"--address={address}", "list", "--no-pager"],
                         capture_output=True, text=True, timeout=20, check=True).stdout  # fmt: skip
    assert "org.freedesktop.DBus" in out


def test_sigterm_stops_and_removes_socket(bus):
    address, path, proc = bus
    assert path.exists()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert not path.exists()


def test_dbus_send_gets_id(bus):
    address, _, _ = bus
    out = subprocess.run(
        ["dbus-send", f"--bus={address}", "--print-reply", "--dest=org.freedesktop.DBus",
         "/org/freedesktop/DBus", "org.freedesktop.DBus.GetId"],
        capture_output=True, text=True, timeout=20, check=True,
    ).stdout  # fmt: skip
    assert "string" in out
