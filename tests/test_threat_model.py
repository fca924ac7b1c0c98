"""Every threat names a test, and every named test exists: a renamed or deleted
test must not leave a mitigation that nothing shows any more."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "docs" / "threat-model.md"
REF = re.compile(r"(tests/[\w/]+\.py)::(\w+)")
ANY_TEST = re.compile(r"tests/[\w/]+(\.py)?")  # a test function, a test file, or the VM tier (tests/vm)


def _rows():
    """Rows of the threat | mitigation | test tables (not the actors table)."""
    header = None
    for line in MODEL.read_text().splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif header[0] == "threat" and len(cells) == 3 and not set(cells[0]) <= {"-"}:
            yield cells


def test_every_threat_row_names_a_test():
    rows = list(_rows())
    assert len(rows) > 50
    missing = [r[0] for r in rows if not ANY_TEST.search(r[2])]
    assert not missing, f"threats without a test: {missing}"


def test_every_named_test_exists():
    gone = []
    for _, _, tests in _rows():
        for path, name in REF.findall(tests):
            f = ROOT / path
            if not f.exists() or not re.search(rf"^\s*(async )?def {name}\(", f.read_text(), re.M):
                gone.append(f"{path}::{name}")
        for m in ANY_TEST.finditer(tests):
            if not (ROOT / m.group(0)).exists():
                gone.append(m.group(0))
    assert not gone, f"the threat model names tests that do not exist: {gone}"


def test_assembled_model_matches_its_fragments(tmp_path):
    out = subprocess.run(["sh", "-c", 'for f in docs/threat/*.md; do cat "$f"; echo; done'], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert out == MODEL.read_text(), "docs/threat-model.md is stale: run scripts/threat-model.sh"
