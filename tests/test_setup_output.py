"""`make setup` and `make lint` say briefly what they do: one line per step with work to do, a tool's own
output only when it fails, so a terminal (and `make test`'s log) stays readable."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _set_up() -> str | None:
    """Why this tree is not fully set up, or None."""
    if not (ROOT / ".venv/.installed").exists() or not (ROOT / ".venv/bin/sealbus").exists():
        return "no .venv (make setup)"
    if subprocess.run([str(ROOT / "scripts/policy-corpus.sh"), "--check"]).returncode != 0:
        return "the policy corpus is not fetched (setup would fetch it now)"
    return None


def test_setup_on_a_set_up_tree_prints_one_line():
    why = _set_up()
    if why:
        pytest.skip(why)
    out = subprocess.run([str(ROOT / "scripts/setup.sh")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = (out.stdout + out.stderr).splitlines()
    assert lines == ["setup: up to date (.venv, Debian packages, dbench, policy corpus)"], lines


def test_lint_prints_a_line_per_gate_when_clean():
    if _set_up():
        pytest.skip(_set_up())
    out = subprocess.run(["make", "-s", "lint"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, timeout=300, env={**os.environ, "MAKEFLAGS": ""})  # fmt: skip
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and len(lines) == 4, lines  # setup's line, then one per gate
    assert lines[0].startswith("setup: up to date") and lines[-1] == "lint: ruff format: clean", lines
