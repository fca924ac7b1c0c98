"""Counting the work a call does, to check complexity claims without timing anything.

``work(fn)`` runs ``fn()`` and returns how many Python lines executed in the
process while it ran (``sys.settrace`` line events). A loop over N entries in
Python code costs N times its body, so comparing the counts of two runs that differ
only in bystanders' state shows whether the code scanned them.
"""

import sys


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
