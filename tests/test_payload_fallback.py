"""The client picks its payload transport by itself: a sealed memfd where the kernel
can seal, the FUSE payload fs where it cannot. "Cannot" is made real with a seccomp
filter that fails memfd_create with ENOSYS in the sender (as on a kernel without
memfd), against a real bus serving a real FUSE mount."""

import hashlib
import os
import re
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts the payload fs: needs root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
    pytest.mark.timeout(120),
]

SEALBUS = os.path.join(os.path.dirname(sys.executable), "sealbus")
IFACE = "org.sealbus.Test"
NO_MEMFD = r"""
import errno, sys
import pyseccomp as sc
f = sc.SyscallFilter(defaction=sc.ALLOW)
f.add_rule(sc.ERRNO(errno.ENOSYS), "memfd_create")
f.load()
from broker.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def fs_bus(sealbus_factory, tmp_path):
    mnt = tmp_path / "fs"
    mnt.mkdir()
    bus = sealbus_factory("--fd-mode", "sealed", "--payload-fs", str(mnt))
    return bus, str(mnt)


def send_and_receive(bus, sender_argv, payload, tmp_path):
    src = tmp_path / "payload.bin"
    src.write_bytes(payload)
    recv = subprocess.Popen([SEALBUS, "receive", "--address", bus.address, "--name", "org.sealbus.Sink",
                             "--count", "1"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert recv.stdout.readline().startswith("listening as ")
        sent = subprocess.run([*sender_argv, "send", "--address", bus.address, "--dest", "org.sealbus.Sink",
                               "--path", "/t", "--interface", IFACE, "--member", "Take", "--payload", str(src)],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        out, _ = recv.communicate(timeout=30)
    finally:
        recv.kill()
    return sent.stdout, out


def test_sender_without_memfd_falls_back_to_the_payload_fs(fs_bus, tmp_path):
    bus, _mnt = fs_bus
    payload = os.urandom(3 * 1024 * 1024 + 5)
    sent, got = send_and_receive(bus, [sys.executable, "-c", NO_MEMFD], payload, tmp_path)
    assert "via=fuse" in sent
    assert "kind=payload-snapshot" in got and f"sha256={hashlib.sha256(payload).hexdigest()}" in got
    # the receiver holds the broker's snapshot inode, the very one the sender was handed
    ino = re.search(r"dev=(\d+) ino=(\d+)", sent).groups()
    assert re.search(r"dev=(\d+) ino=(\d+)", got).groups() == ino


def test_sender_with_memfd_uses_it(fs_bus, tmp_path):
    bus, _mnt = fs_bus
    payload = os.urandom(100_000)
    sent, got = send_and_receive(bus, [SEALBUS], payload, tmp_path)
    assert "via=memfd" in sent and "kind=sealed-memfd" in got
    assert f"sha256={hashlib.sha256(payload).hexdigest()}" in got


def test_forcing_fuse_works_where_memfd_would(fs_bus, tmp_path):
    bus, _mnt = fs_bus
    src = tmp_path / "p"
    src.write_bytes(b"forced")
    sent = subprocess.run([SEALBUS, "send", "--via", "fuse", "--address", bus.address, "--dest", "org.freedesktop.DBus",
                           "--path", "/org/freedesktop/DBus", "--interface", "org.freedesktop.DBus.Peer",
                           "--member", "Ping", "--payload", str(src)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "via=fuse" in sent.stdout, sent.stderr


def test_forcing_memfd_without_memfd_fails_instead_of_switching(fs_bus, tmp_path):
    bus, _mnt = fs_bus
    src = tmp_path / "p"
    src.write_bytes(b"x")
    r = subprocess.run([sys.executable, "-c", NO_MEMFD, "send", "--via", "memfd", "--address", bus.address,
                        "--dest", "a.b", "--path", "/", "--interface", IFACE, "--member", "M", "--payload", str(src)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode != 0 and "via=" not in r.stdout


def test_receiver_trusts_snapshots_only_from_its_bus_payload_fs(tmp_path):
    from broker.client.memfd import PayloadError
    from broker.client.payload import trusted_kind

    f = tmp_path / "plain"
    f.write_bytes(b"x")
    f.chmod(0o400)  # read-only looking, but not on the payload fs the bus announced: anyone could change it
    fd = os.open(f, os.O_RDONLY)
    try:
        with pytest.raises(PayloadError, match="cannot trust"):
            trusted_kind(fd)
        assert trusted_kind(fd, {os.fstat(fd).st_dev}) == "payload-snapshot"  # only the bus's device is trusted
    finally:
        os.close(fd)


def test_no_memfd_and_no_payload_fs_is_a_clear_error(sealbus, tmp_path):
    src = tmp_path / "p"
    src.write_bytes(b"x")
    env = dict(os.environ, SEALBUS_PAYLOAD_FS="/nonexistent")
    r = subprocess.run([sys.executable, "-c", NO_MEMFD, "send", "--address", sealbus.address, "--dest", "a.b",
                        "--path", "/", "--interface", IFACE, "--member", "M", "--payload", str(src)],
                       capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert r.returncode != 0 and "no sealbus payload filesystem is mounted" in r.stderr
