"""Benchmark (not a test): broker and sender memory during one large FUSE payload transfer.

    .venv/bin/python -m benchmarks.fuse_rss [--size-mib 1024] [--in-memory]

Starts `sealbus run --payload-fs` (needs root, or fusermount3), a receiver
that saves the payload (`sealbus receive --out`, an in-kernel copy) and
`sealbus send --via fuse` of a file of --size-mib MiB. Printed: the broker's
RSS before and its peak (VmHWM) after, the sender's and the receiver's peak
RSS, the time, and whether the bytes arrived intact. The per-user quota is
raised to fit the file (<payload_fs max_bytes_per_user>). Results go to
docs/payload-fs.md by hand.
"""

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
import time

SEALBUS = os.path.join(os.path.dirname(sys.executable), "sealbus")
MiB = 1 << 20
CONFIG = """<busconfig><type>session</type>
  <policy context="default"><allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/>
  <allow own="*"/></policy>
  <sealbus><payload_fs max_bytes_per_user="{quota}"/></sealbus></busconfig>"""


def status_kib(pid: int, field: str) -> int:
    """VmRSS, VmHWM...: kiB, from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def child_peak_kib(argv, **kw) -> tuple[subprocess.CompletedProcess, int]:
    """Run argv to its end: (result, its peak RSS in kiB).

    The peak is the child's own VmHWM, read from /proc while it runs. Not wait4's ru_maxrss: exec
    records there the peak of the memory the child started from, which after subprocess's vfork is
    its parent's (a pytest process that has run two thousand tests: over 100 MB).
    """
    proc = subprocess.Popen(argv, **kw)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, status_kib(proc.pid, "VmHWM"))
        except (OSError, KeyError):
            pass  # exiting: its memory is gone already
        time.sleep(0.005)
    out = proc.stdout.read() if proc.stdout else ""
    err = proc.stderr.read() if proc.stderr else ""
    return subprocess.CompletedProcess(argv, proc.returncode, out, err), peak


def write_file(path: str, size: int) -> None:
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for i in range(size // MiB):
            f.write(block[i % 251 :] + block[: i % 251])  # every MiB different, cheaply
        f.write(os.urandom(size % MiB))


def measure(size: int, workdir: str) -> dict:
    """One transfer of size bytes through a fresh bus (the sender with --progress): the numbers (kiB,
    seconds), the checks, and what the sender and the bus printed."""
    mnt, got, sock = (os.path.join(workdir, n) for n in ("fs", "got", "bus"))
    os.makedirs(mnt)
    os.makedirs(got)
    src = os.path.join(workdir, "big.bin")
    write_file(src, size)
    conf = os.path.join(workdir, "bus.conf")
    with open(conf, "w") as f:
        f.write(CONFIG.format(quota=max(size, 256 * MiB)))
    log = open(os.path.join(workdir, "bus.log"), "w")
    bus = subprocess.Popen([SEALBUS, "run", "--address", f"unix:path={sock}", "--config", conf, "--payload-fs", mnt],
                           stdout=subprocess.PIPE, stderr=log, text=True)  # fmt: skip
    try:
        address = bus.stdout.readline().strip()
        if not address:
            raise SystemExit("the bus did not start: " + open(log.name).read())
        recv = subprocess.Popen([SEALBUS, "receive", "--address", address, "--name", "org.sealbus.Sink", "--count",
                                 "1", "--out", got], stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert recv.stdout.readline().startswith("listening as ")
        time.sleep(0.5)  # the bus settles after start (its FUSE probe, gc.freeze)
        before = status_kib(bus.pid, "VmRSS")
        t0 = time.monotonic()
        sent, sender_peak = child_peak_kib(
            [SEALBUS, "send", "--address", address, "--dest", "org.sealbus.Sink", "--path", "/p", "--interface",
             "org.sealbus.Sink", "--member", "Take", "--payload", src, "--via", "fuse", "--timeout", "600",
             "--progress"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        _, status, usage = os.wait4(recv.pid, 0)
        recv.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.monotonic() - t0
        if sent.returncode != 0:
            raise SystemExit(f"send failed: {sent.stderr}")
        peak = status_kib(bus.pid, "VmHWM")
        return {"size_mib": size // MiB, "broker_rss_before_kib": before, "broker_peak_kib": peak,
                "sender_peak_kib": sender_peak, "receiver_peak_kib": usage.ru_maxrss, "seconds": round(elapsed, 2),
                "intact": filecmp.cmp(src, os.path.join(got, "payload-1.bin"), shallow=False),
                "sender_stderr": sent.stderr, "bus_log": open(log.name).read()}  # fmt: skip
    finally:
        bus.terminate()
        bus.wait(timeout=30)
        log.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=1024)
    a = p.parse_args()
    workdir = tempfile.mkdtemp(prefix="sealbus-fuse-rss-")
    try:
        r = measure(a.size_mib * MiB, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for k, v in r.items():
        if k not in ("sender_stderr", "bus_log"):
            print(f"{k}: {v}")
    return 0 if r["intact"] else 1


if __name__ == "__main__":
    sys.exit(main())
