"""Smoke test of the benchmark driver (`make bench`), NOT a timed test.

It runs one tiny round-trip benchmark and one sealed-memfd transfer end to end
through dbench against dbus-daemon and sealbus, and checks that every run
completed, was measured, and was rendered. No speed is asserted: this machine
is shared and the numbers mean nothing at this size.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DBENCH = os.path.join(ROOT, "benchmarks", "dbench", "dbench")
TARGETS = ("dbus-daemon", "sealbus")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(DBENCH), reason="dbench not built (scripts/setup.sh builds it)"),
    pytest.mark.skipif(shutil.which("dbus-daemon") is None, reason="dbus-daemon not installed"),
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    md, raw = out / "benchmarks.md", out / "raw.json"
    cmd = [sys.executable, "-m", "benchmarks.run", "--quick", "--only", "ping_k1_d16,large_fd_1M,startup",
           "--targets", ",".join(TARGETS), "--md", str(md), "--json", str(raw)]  # fmt: skip
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert p.returncode == 0, p.stderr[-2000:]
    return out, md, json.loads(raw.read_text()), p.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("target", TARGETS)
def test_every_run_completes_against(quick_run, target):
    _, _, d, log = quick_run
    assert target in [t["label"] for t in d["targets"]], "left out: " + log[-1000:]
    runs = {r["bench"]: r["runs"] for r in d["results"] if r["target"] == target}
    assert set(runs) == {"ping_k1_d16", "large_fd_1M"}
    (ping,) = runs["ping_k1_d16"]
    assert ping["_ok"], ping
    assert ping["calls"] > 0 and ping["errors"] == 0
    (fd,) = runs["large_fd_1M"]
    assert fd["_ok"], fd  # every transfer arrived sealed, with the right checksum
    assert fd["transport"] == "memfd" and fd["size"] == 1 << 20
    # transit is receiver's view time minus sender's ready time: positive, and
    # no longer than the whole call it is part of
    assert 0 < fd["transit_med_ms"] <= fd["e2e_med_ms"]


@pytest.mark.timeout(120)
def test_report_and_plots_are_written_and_rerender_identically(quick_run):
    out, md, _, _ = quick_run
    text = md.read_text()
    assert "| Ping(ay16) K=1 pipelined depth 16 | calls/s |" in text
    assert "sealbus/dbus-daemon" in text
    for png in ("benchmarks-transit.png", "benchmarks-throughput.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = out / "again.md"
    subprocess.run([sys.executable, "-m", "benchmarks.run", "--render", str(out / "raw.json"), "--md", str(again)],
                   cwd=ROOT, check=True, capture_output=True, timeout=60)  # fmt: skip
    assert again.read_text() == text.replace("benchmarks-", "again-")


def test_hop_micro_benchmark_runs():
    """The in-process hop benchmark drives the real Connection/Bus code; it must keep working as they change."""
    p = subprocess.run([sys.executable, "-m", "benchmarks.hop_micro"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [line.split()[0:2] for line in p.stdout.splitlines()]
    assert [r[0] for r in rows] == ["call", "reply", "syscall"]


@pytest.mark.timeout(120)
def test_startup_row_measures_each_bus_and_is_rendered(quick_run):
    """The start-up row (exec to the first answered call): one start per target in a quick run, each answered
    (a Hello reply parsed), rendered with its ratio in the targets table; no time is asserted."""
    _, md, d, _ = quick_run
    runs = d["startup"]["runs"]
    assert set(runs) == set(TARGETS)
    for target in TARGETS:
        (r,) = runs[target]
        assert r["_ok"], r
        assert r["wall_ms"] > 0 and r["cpu_ms"] > 0  # both direct children: their CPU comes from wait4
    text = md.read_text()
    assert "| start-up, exec to the first answered call (wall) vs dbus-daemon | ≤ x2.00 | x" in text
    assert "| start-up, exec to Hello answered | sealbus | dbus-daemon |" in text


def test_startup_benchmark_fails_loudly_on_a_bus_that_never_answers(tmp_path):
    """A start that never answers is a failed run with its reason, not a time."""
    from benchmarks import startup

    fake = tmp_path / "not-a-bus"
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(0o755)
    real = startup.SEALBUS_DAEMON
    startup.SEALBUS_DAEMON = str(fake)
    try:
        r = startup.start_once("sealbus", timeout=10)
    finally:
        startup.SEALBUS_DAEMON = real
    assert not r["_ok"] and "exited with status 3" in r["_error"]
