"""sealbus. This file decides which build of the hot path runs: compiled or pure Python.

The hot-path modules (``HOT_MODULES``) may be compiled by Cython in place
(``setup.py build_ext --inplace``, run by ``make setup``): the extension
module then sits next to its unchanged ``.py`` file and Python would import
it first. The finder installed here picks the ``.py`` file instead when

- ``SEALBUS_PURE_PYTHON`` is set to anything but ``""``/``0`` (the pure build, forced), or
- the extension is older than its ``.py`` (or ``.pxd``): stale compiled code never
  runs what the source no longer says; ``make setup`` rebuilds it, or
- a module its ``.pxd`` cimports (whose extension types it uses as C types) runs as
  pure Python: the extension would fail at import (``runs_compiled``).

``build()`` says which build is loaded (``sealbus --version``, the start-up log).
"""

import importlib.machinery
import importlib.util
import os
import re
import sys

HOT_MODULES = (
    "broker.wire.message",
    "broker.wire.body_check",
    "broker.wire.framer",
    "broker.bus.peer",
    "broker.bus.replies",
    "broker.bus.router",
    "broker.bus.names",
    "broker.io.sysio",
    "broker.io.connection",
    "broker.io.reactor",
    "broker.io.busy_poll",
    "broker.io.server",
)
PURE_ENV = "SEALBUS_PURE_PYTHON"


def pure_forced() -> bool:
    return os.environ.get(PURE_ENV, "") not in ("", "0")


def _source_of(extension: str) -> str:
    """The ``.py`` file an extension module was compiled from (``x.cpython-311-....so`` -> ``x.py``)."""
    folder, name = os.path.split(extension)
    return os.path.join(folder, name.split(".", 1)[0] + ".py")


def is_stale(extension: str) -> bool:
    """True if ``extension`` is older than the source it was built from (``.py``, or its ``.pxd``)."""
    try:
        built = os.stat(extension).st_mtime
    except OSError:
        return True
    source = _source_of(extension)
    for path in (source, source[:-3] + ".pxd"):
        try:
            if os.stat(path).st_mtime > built:
                return True
        except FileNotFoundError:
            continue
    return False


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_CIMPORT = re.compile(r"^from\s+(broker(?:\.\w+)+)\s+cimport\b", re.M)


def _file_of(module: str, suffix: str) -> str:
    return os.path.join(_PACKAGE_DIR, *module.split(".")[1:]) + suffix


def cimports(module: str) -> tuple:
    """The hot modules whose extension types the compiled ``module`` uses (``from broker.x cimport`` in its
    ``.pxd``): its extension can only be loaded when theirs are (Cython checks the types at import)."""
    try:
        with open(_file_of(module, ".pxd")) as f:
            return tuple(_CIMPORT.findall(f.read()))
    except FileNotFoundError:
        return ()


def runs_compiled(module: str, _seen: frozenset = frozenset()) -> bool:
    """Whether the extension of a hot module may run: not forced pure, built, not stale, and so are the
    extensions of the modules it cimports (a pure or stale dependency would stop it at import)."""
    if pure_forced():
        return False
    if module in _seen:
        return True  # a cimport cycle: the modules on it decide
    built = [e for e in (_file_of(module, s) for s in importlib.machinery.EXTENSION_SUFFIXES) if os.path.exists(e)]
    if not built or is_stale(built[0]):
        return False
    return all(runs_compiled(dep, _seen | {module}) for dep in cimports(module))


class _HotPathFinder:
    """A meta path finder for HOT_MODULES only: the ``.py`` file when the extension must not run."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name not in HOT_MODULES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.origin is None or spec.origin.endswith(".py"):
            return spec
        if not runs_compiled(name):
            return importlib.util.spec_from_file_location(name, _source_of(spec.origin))
        return spec


def build() -> str:
    """Which build of the hot path is loaded: "compiled", "pure Python", or "mixed (...)" with the pure ones
    named (a module that failed to compile, or whose extension is stale). Imports the hot modules."""
    import importlib

    pure = [m for m in HOT_MODULES if importlib.import_module(m).__file__.endswith(".py")]
    if not pure:
        return "compiled"
    if len(pure) == len(HOT_MODULES):
        return "pure Python" + (f" ({PURE_ENV})" if pure_forced() else "")
    return "mixed (pure: " + ", ".join(m.rsplit(".", 1)[1] for m in pure) + ")"


if _HotPathFinder not in sys.meta_path:
    sys.meta_path.insert(0, _HotPathFinder)
