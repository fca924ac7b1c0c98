"""scripts/check-layers.py: the real tree passes, and the check fails on what it must catch."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "check-layers.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def tree(tmp_path, files: dict[str, str], known: str = "") -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    for pkg in ("broker", "broker/wire", "broker/bus", "broker/access", "broker/payload", "broker/io",
                "broker/launch", "broker/client"):  # fmt: skip
        (tmp_path / pkg).mkdir(parents=True, exist_ok=True)
        (tmp_path / pkg / "__init__.py").touch()
    (tmp_path / "scripts").mkdir(exist_ok=True)
    (tmp_path / "scripts" / "layers-known.txt").write_text(known)
    return tmp_path


def check(tmp_path, files: dict[str, str], known: str = ""):
    """check-layers.py run on a tree holding only ``files`` (and ``known`` as its layers-known.txt)."""
    return run("--root", str(tree(tmp_path, files, known)))


def test_the_tree_has_only_the_listed_violations():
    r = run()
    assert r.returncode == 0, r.stderr
    assert "check-layers: ok" in r.stdout


def test_downward_imports_pass(tmp_path):
    r = check(tmp_path, {
        "broker/wire/a.py": "from . import b\n",
        "broker/wire/b.py": "X = 1\n",
        "broker/bus/c.py": "from ..wire import a\nimport broker.wire.b\n",
        "broker/io/d.py": "from ..bus.c import thing\nfrom broker.payload import e\n",
        "broker/payload/e.py": "from ..bus import c\n",
        "broker/cli.py": "from .client import f\nfrom .launch import g\n",
        "broker/client/f.py": "from ..payload import e\n",
        "broker/launch/g.py": "import broker\nimport broker.io.d\n",
    })  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_upward_import_inside_a_function_fails(tmp_path):
    r = check(tmp_path, {
        "broker/wire/a.py": "def f():\n    from ..bus import c\n    return c\n",
        "broker/bus/c.py": "X = 1\n",
    })  # fmt: skip
    assert r.returncode == 1
    assert "broker/wire/a.py:2: upward import" in r.stderr
    assert "upward broker.wire.a -> broker.bus.c" in r.stderr


def test_absolute_upward_import_and_sibling_import_fail(tmp_path):
    r = check(tmp_path, {
        "broker/access/a.py": "import broker.launch.g\nfrom broker.payload.e import X\n",
        "broker/payload/e.py": "X = 1\n",
        "broker/launch/g.py": "from broker.cli import main\n",
        "broker/cli.py": "def main(): pass\n",
    })  # fmt: skip
    assert r.returncode == 1
    for key in ("upward broker.access.a -> broker.launch.g", "upward broker.access.a -> broker.payload.e",
                "upward broker.launch.g -> broker.cli"):  # fmt: skip
        assert key in r.stderr


def test_cycle_within_a_layer_fails(tmp_path):
    r = check(tmp_path, {
        "broker/bus/router.py": "def f():\n    from .driver import D\n",
        "broker/bus/driver.py": "from .router import R\n",
        "broker/bus/other.py": "from . import router\n",
    })  # fmt: skip
    assert r.returncode == 1
    assert "cycle broker.bus.driver broker.bus.router" in r.stderr
    assert "broker.bus.other" not in r.stderr.split("cycle")[1]


def test_listed_violation_passes_and_fixed_one_must_be_removed(tmp_path):
    files = {"broker/wire/a.py": "from ..io import d\n", "broker/io/d.py": "X = 1\n"}
    root = tree(tmp_path, files, "upward broker.wire.a -> broker.io.d  # to be fixed\n")
    assert run("--root", str(root)).returncode == 0
    (root / "broker/wire/a.py").write_text("X = 2\n")
    r = run("--root", str(root))
    assert r.returncode == 1
    assert "'upward broker.wire.a -> broker.io.d' is fixed: remove it" in r.stderr


def test_a_listed_violation_needs_a_reason(tmp_path):
    files = {"broker/wire/a.py": "from ..io import d\n", "broker/io/d.py": "X = 1\n"}
    r = check(tmp_path, files, "upward broker.wire.a -> broker.io.d\n")
    assert r.returncode == 1
    assert "needs its reason" in r.stderr
