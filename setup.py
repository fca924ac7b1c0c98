"""Optional compiled build of the hot path: Cython in pure-Python mode, as dbus-fast does.

    .venv/bin/python setup.py build_ext --inplace     # make setup runs this

The modules in ``broker.HOT_MODULES`` are compiled from their unchanged ``.py``
files (with the ``.pxd`` next to them, where there is one) into extension
modules beside them. The build is optional: without Cython or a C compiler,
or when a module fails to compile, a message says so and that module stays
pure Python. ``SEALBUS_PURE_PYTHON=1`` skips the build (and, at run time,
ignores built modules: see broker/__init__.py). ``pip install`` builds them
too when Cython is importable in its build environment.
"""

import ast
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def hot_modules() -> tuple:
    """``broker.HOT_MODULES``, read from broker/__init__.py without importing the package (one list)."""
    with open(os.path.join(HERE, "broker", "__init__.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "HOT_MODULES":
            return ast.literal_eval(node.value)
    raise SystemExit("setup.py: broker/__init__.py has no HOT_MODULES")


DIRECTIVES = {
    "language_level": 3,
    "annotation_typing": False,  # Python annotations stay documentation: no new type checks at run time
    "embedsignature": True,
}


def say(msg: str) -> None:
    print(f"sealbus build: {msg}", file=sys.stderr)


def extensions() -> list:
    if os.environ.get("SEALBUS_PURE_PYTHON", "") not in ("", "0"):
        say("SEALBUS_PURE_PYTHON is set: pure Python build, nothing compiled")
        return []
    # Cython imports Pythran when it can (Debian's python3-pythran, visible from the venv), and Pythran
    # imports numpy.distutils, which patches the C compiler class with code that fails on current
    # setuptools. The hot path needs neither.
    sys.modules.setdefault("pythran", None)
    try:
        from Cython.Build import cythonize
    except ImportError:
        say("Cython is not installed: pure Python build (pip install cython, then make setup)")
        return []
    sources = [os.path.join(*m.split(".")) + ".py" for m in hot_modules()]
    return cythonize(sources, compiler_directives=DIRECTIVES, build_dir="build/cython", quiet=True)


class OptionalBuildExt(build_ext):
    """A module that fails to compile stays pure Python: one clear message, never a failed install."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # no compiler, no Python headers
            say(f"cannot compile ({e}): the hot path runs as pure Python")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:
            say(f"cannot compile {ext.name} ({e}): it runs as pure Python")


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
