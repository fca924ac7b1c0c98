"""Shared fixtures: real buses (sealbus, dbus-daemon) on real sockets."""

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

VENV_BIN = os.path.dirname(sys.executable)
SEALBUS = os.path.join(VENV_BIN, "sealbus")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_USERS = ("sealbus-test1", "sealbus-test2")


class Bus:
    def __init__(self, proc, address, path):
        self.proc = proc
        self.address = address
        self.path = path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                rc = self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait()
        else:
            rc = self.proc.wait()
        shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)
        return rc


def start_sealbus(tmp_path, *args, name="bus") -> Bus:
    """Start `sealbus run` on a socket reachable by every uid; extra args go to `sealbus run`."""
    sockdir = tempfile.mkdtemp(prefix="sealbus-test-")
    os.chmod(sockdir, 0o755)  # other test users must reach the socket
    path = Path(sockdir) / name
    log = open(tmp_path / f"{name}.log", "w")
    proc = subprocess.Popen([SEALBUS, "run", "--address", f"unix:path={path}", *args],
                            stdout=subprocess.PIPE, stderr=log, text=True)  # fmt: skip
    address = proc.stdout.readline().strip()
    if not address:
        proc.wait(timeout=10)
        raise RuntimeError("sealbus did not start: " + (tmp_path / f"{name}.log").read_text())
    return Bus(proc, address, path)


def start_dbus_daemon(tmp_path, config: str | None = None, name="dd") -> Bus:
    sockdir = tempfile.mkdtemp(prefix="sealbus-test-")
    os.chmod(sockdir, 0o755)
    path = Path(sockdir) / name
    args = ["dbus-daemon", "--nofork", "--print-address=1", f"--address=unix:path={path}"]
    args.append(f"--config-file={config}" if config else "--session")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    address = proc.stdout.readline().strip().split(",guid=")[0]
    return Bus(proc, address, path)


@pytest.fixture
def sealbus(tmp_path):
    bus = start_sealbus(tmp_path)
    yield bus
    bus.stop()


@pytest.fixture
def sealbus_factory(tmp_path):
    buses = []

    def make(*args, name="bus"):
        b = start_sealbus(tmp_path, *args, name=name)
        buses.append(b)
        return b

    yield make
    for b in buses:
        b.stop()


@pytest.fixture
def dbus_daemon(tmp_path):
    bus = start_dbus_daemon(tmp_path)
    yield bus
    bus.stop()


def ensure_test_users() -> list[pwd.struct_passwd]:
    """Create (once) the unprivileged users tests run clients as."""
    out = []
    for u in TEST_USERS:
        try:
            out.append(pwd.getpwnam(u))
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", u],
                           check=True)  # fmt: skip
            out.append(pwd.getpwnam(u))
    return out


@pytest.fixture
def test_users():
    if os.geteuid() != 0:
        pytest.skip("needs root to run clients as other users")
    return ensure_test_users()


def run_as(user: pwd.struct_passwd, argv, **kw) -> subprocess.CompletedProcess:
    """Run a command as another user (real setuid/setgid in the child)."""

    def demote():
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 30)
    return subprocess.run(argv, preexec_fn=demote, **kw)


def have(cmd: str) -> bool:
    return shutil.which(cmd) is not None
