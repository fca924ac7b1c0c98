"""Every atheris target runs briefly (SEALBUS_FUZZ_BRIEF seconds, default 8) from its corpus, in a
subprocess of its own (libFuzzer owns the process). A crash fails the test, names the input and keeps
it as tests/fuzz_corpus/<target>/crash-*, which test_fuzz.py replays from then on. ``make fuzz``
runs the same targets for SEALBUS_FUZZ_SECONDS each (tests/fuzz/run.py)."""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from .fuzz import TARGETS, missing
from .fuzz.run import CORPUS, run_target

BRIEF = float(os.environ.get("SEALBUS_FUZZ_BRIEF", "8"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed"),
]


@pytest.mark.timeout(BRIEF * 2 + 150)
@pytest.mark.parametrize("name", TARGETS)
def test_atheris_target(name, tmp_path):
    why = missing(name)
    if why:
        pytest.skip(f"target {name}: {why}")
    r = run_target(name, BRIEF, tmp_path)
    kept = []
    for c in r["crashes"]:
        dest = CORPUS / name / os.path.basename(c)
        shutil.copy(c, dest)
        kept.append(str(dest))
    assert not kept, f"{name}: crash kept as {kept}\n{r['log'][-3000:]}"
    assert r["returncode"] == 0, f"{name}: libFuzzer exited {r['returncode']}\n{r['log'][-3000:]}"
    assert r["inputs"] > 0 and r["cov"] > 0, f"{name}: nothing executed\n{r['log'][-3000:]}"
    print(f"{name}: {r['inputs']} inputs, cov {r['cov']} ft {r['ft']}")


def test_hot_path_is_instrumented():
    # broker's finder (the .py of a hot module over its extension) sat ahead of atheris's: framer, header
    # view and body validator ran uninstrumented, or compiled, and the fuzzers were blind to them
    code = (
        "import sys; from tests.fuzz.run import load_target; load_target('framer'); import broker; "
        "print(*(type(sys.modules[m].__spec__.loader).__name__ for m in broker.HOT_MODULES if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=CORPUS.parents[1], capture_output=True, text=True,
                         check=True).stdout.split()  # fmt: skip
    assert len(out) >= 3 and set(out) == {"AtherisSourceFileLoader"}, out
