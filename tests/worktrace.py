"""Counting the work a call does, to check complexity claims without timing anything.

``work(fn)`` runs ``fn()`` and returns how many Python lines executed in the
process while it ran (``sys.settrace`` line events). A loop over N entries in
Python code costs N times its body, so comparing the counts of two runs that differ
only in bystanders' state shows whether the code scanned them.

Compiled modules (the hot path, see broker/__init__.py) run no Python lines: a
test that counts work through them is marked ``needs_python_lines`` and runs on
the pure build (``make test-pure``), where it can fail.
"""

import importlib
import sys

import pytest

import broker

needs_python_lines = pytest.mark.skipif(
    not all(importlib.import_module(m).__file__.endswith(".py") for m in broker.HOT_MODULES),
    reason="counts Python lines, and the hot path is compiled: runs on the pure build (make test-pure)",
)


def work(fn) -> int:
    n = 0

    def tracer(frame, event, arg):
        nonlocal n
        if event == "line":
            n += 1
        return tracer

    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(old)
    return n
