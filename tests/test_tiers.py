"""The security tiers: root-only tests are marked however they say so, and a run that skipped
them ends with a banner that says so (tests/conftest.py)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONFTEST = """\
import pytest
from tests.conftest import pytest_collection_modifyitems, pytest_terminal_summary  # noqa: F401


@pytest.fixture
def test_users():
    pytest.skip("needs root to run clients as other users")


@pytest.fixture
def mounted():
    if os.geteuid() != 0:
        pytest.skip("mounting FUSE needs root here")
"""

TESTS = """\
import os

import pytest


@pytest.mark.skipif(True, reason="the privilege-separated system bus needs root")
def test_skipif_naming_root():
    pass


def test_uses_test_users(test_users):
    pass


def test_inline(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("pidfd_getfd on the bus process needs root (ptrace)")


def test_via_fixture(mounted):
    pass


@pytest.mark.skipif(True, reason="no /dev/fuse")
def test_other_skip():
    pass


def test_plain():
    pass
"""


def run_pytest(tmp_path, *args):
    (tmp_path / "conftest.py").write_text("import os\n" + CONFTEST)
    (tmp_path / "test_sample.py").write_text(TESTS)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                           "--rootdir", str(tmp_path), "-c", "/dev/null", *args, str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip


def test_root_only_tests_get_the_root_marker(tmp_path):
    r = run_pytest(tmp_path, "--collect-only", "-m", "root")
    assert r.returncode == 0, r.stdout + r.stderr
    got = sorted(line.split("::")[1] for line in r.stdout.splitlines() if "::" in line)
    assert got == ["test_inline", "test_skipif_naming_root", "test_uses_test_users", "test_via_fixture"]


def test_a_run_that_skipped_the_root_tier_says_so(tmp_path):
    r = run_pytest(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "SECURITY TIERS NOT EXERCISED BY THIS RUN" in out
    skipped = 4 if os.geteuid() != 0 else 2  # as root the two inline geteuid skips run
    assert f"root tier (other uids, privilege drop, FUSE mounts, the privilege-separated system bus): {skipped} test(s) SKIPPED" in out  # fmt: skip
