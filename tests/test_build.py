"""Which build of the hot path runs: compiled modules when built and fresh, pure Python when forced or stale.

The compiled modules sit next to their ``.py`` files (``setup.py build_ext --inplace``), where Python
would import them first; broker/__init__.py decides instead. These tests run fresh interpreters so that
the decision is made at import, as in the broker.
"""

import ast
import glob
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import broker

ROOT = Path(__file__).resolve().parent.parent
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def loaded_files(env_extra: dict) -> dict:
    """module -> the file it was loaded from, in a fresh interpreter with ``env_extra`` set."""
    env = dict(os.environ, **env_extra)
    code = "import importlib, broker, json; print(json.dumps({m: importlib.import_module(m).__file__ for m in broker.HOT_MODULES}))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def compiled_present() -> bool:
    return all(glob.glob(str(ROOT / (m.replace(".", "/") + ".*.so"))) for m in broker.HOT_MODULES)


def test_pure_build_loads_only_sources():
    files = loaded_files({"SEALBUS_PURE_PYTHON": "1"})
    assert set(files) == set(broker.HOT_MODULES)
    for module, path in files.items():
        assert path == str(ROOT / (module.replace(".", "/") + ".py")), module


def test_version_names_the_build():
    sealbus = Path(sys.executable).parent / "sealbus"
    env = dict(os.environ, SEALBUS_PURE_PYTHON="1")
    out = subprocess.run([str(sealbus), "--version"], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.startswith("sealbus ") and "hot path: pure Python" in out.stdout


@pytest.mark.skipif(not compiled_present(), reason="compiled hot path not built (make setup; Cython or gcc missing?)")
def test_compiled_build_loads_extensions():
    files = loaded_files({"SEALBUS_PURE_PYTHON": ""})
    for module, path in files.items():
        assert path.endswith(SUFFIX), (module, path)
    env = dict(os.environ, SEALBUS_PURE_PYTHON="0")
    out = subprocess.run([sys.executable, "-c", "import broker; print(broker.build())"], env=env,
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "compiled"


def test_stale_extension_is_not_loaded(tmp_path):
    """An extension older than its source (edited after the build) is ignored: the source runs."""
    pkg = tmp_path / "broker" / "wire"
    pkg.mkdir(parents=True)
    src = pkg / "framer.py"
    ext = pkg / f"framer{SUFFIX}"
    ext.write_bytes(b"")
    src.write_text("")
    os.utime(ext, (1_000_000, 1_000_000))
    assert broker.is_stale(str(ext))
    os.utime(ext, None)
    os.utime(src, (1_000_000, 1_000_000))
    assert not broker.is_stale(str(ext))
    pxd = pkg / "framer.pxd"  # a newer declaration file makes it stale too
    pxd.write_text("")
    os.utime(ext, (2_000_000, 2_000_000))
    assert broker.is_stale(str(ext))
    assert broker.is_stale(str(pkg / f"missing{SUFFIX}"))  # no extension: nothing to trust


@pytest.mark.skipif(not compiled_present(), reason="compiled hot path not built")
@pytest.mark.parametrize(
    ("edited", "pure"),
    [
        ("wire/framer", "framer, connection, reactor, server"),  # connection cimports Framer; they, Connection
        ("bus/peer", "peer, replies, router, connection, reactor, server"),  # they cimport Peer, or one that does
        ("bus/replies", "replies, router, connection, reactor, server"),  # Bus.replies is a ReplyRegistry
        ("wire/message", "message, framer, router, connection, reactor, server"),  # HeaderView
        ("io/sysio", "sysio, connection, reactor, server"),  # connection calls recv/send as C functions
        ("io/server", "server"),  # nothing cimports it
        ("io/reactor", "reactor"),  # nothing cimports it either
    ],
)
def test_stale_extension_falls_back_in_a_real_import(tmp_path, edited, pure):
    """A copy of the package with one ``.py`` newer than its extension loads that ``.py``, and the ``.py`` of
    every module whose extension cimports its types (that extension would fail at import): the broker
    still starts after an edit without ``make setup``."""
    copy = tmp_path / "tree"
    shutil.copytree(ROOT / "broker", copy / "broker", ignore=shutil.ignore_patterns("__pycache__"))
    os.utime(copy / f"broker/{edited}.py", None)
    folder, name = (copy / "broker" / edited).parent, Path(edited).name
    for so in folder.glob(f"{name}.*.so"):
        os.utime(so, (1_000_000, 1_000_000))
    code = "import broker; print(broker.build())"
    env = dict(os.environ, SEALBUS_PURE_PYTHON="", PYTHONPATH=str(copy))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=copy, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"mixed (pure: {pure})"


def test_cimports_are_read_from_the_pxd():
    assert set(broker.cimports("broker.io.connection")) == {"broker.bus.peer", "broker.bus.router",
                                                            "broker.io.sysio", "broker.wire.framer"}  # fmt: skip
    assert broker.cimports("broker.io.busy_poll") == ()


# The classes each .pxd makes an extension type, and whether its instances keep a __dict__ (``cdef dict
# __dict__``: open, as a plain class, to attributes other layers and tests set on them).
EXTENSION_TYPES = {
    "broker.wire.message": {"HeaderView": False},
    "broker.wire.framer": {"Framer": True},
    "broker.bus.peer": {"Peer": False, "OutItem": False, "FdRef": False},
    "broker.bus.replies": {"ReplySlot": False, "ReplyRegistry": True},
    "broker.bus.router": {"Bus": True},
    "broker.io.connection": {"Connection": True},
    "broker.io.reactor": {"Reactor": True},
    "broker.io.server": {"Server": True},
}
HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: set on classes made by a class statement, not on extension types


def class_kinds(env_extra: dict) -> dict:
    """'module.Class' -> [is an extension type, its instances may have a __dict__], in a fresh interpreter."""
    env = dict(os.environ, **env_extra)
    code = (
        "import importlib, json, sys\n"
        "out = {}\n"
        f"for m, classes in {EXTENSION_TYPES!r}.items():\n"
        "    mod = importlib.import_module(m)\n"
        "    for c in classes:\n"
        "        cls = getattr(mod, c)\n"
        f"        out[m + '.' + c] = [not cls.__flags__ & {HEAPTYPE}, cls.__dictoffset__ != 0]\n"
        "print(json.dumps(out))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not compiled_present(), reason="compiled hot path not built")
def test_compiled_build_makes_the_declared_classes_extension_types():
    """Each .pxd takes effect: the per-message and per-peer classes have C fields in the compiled build,
    and those other layers set attributes on keep a __dict__ for them."""
    kinds = class_kinds({"SEALBUS_PURE_PYTHON": ""})
    for m, classes in EXTENSION_TYPES.items():
        for c, has_dict in classes.items():
            assert kinds[f"{m}.{c}"] == [True, has_dict], f"{m}.{c}"


def test_pure_build_keeps_plain_classes():
    kinds = class_kinds({"SEALBUS_PURE_PYTHON": "1"})
    assert all(not extension for extension, _ in kinds.values()), kinds


def test_setup_py_compiles_broker_hot_modules():
    """setup.py keeps no list of its own: its hot_modules() reads broker.HOT_MODULES from the source."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "hot_modules")
    ns = {"ast": ast, "os": os, "HERE": str(ROOT)}
    exec(compile(ast.Module([fn], type_ignores=[]), "setup.py", "exec"), ns)
    assert ns["hot_modules"]() == broker.HOT_MODULES
