"""Fuzzing in the plain test run: every corpus file replayed, and bounded random mutation.

``test_corpus_regressions`` feeds every file of tests/fuzz_corpus/<target>/ (seeds from real traffic and
real files, inputs libFuzzer kept for their coverage, and every crash ever found, named ``crash-*``)
to its target's ``TestOneInput`` (tests/fuzz/), without atheris. ``test_fuzz_framer_header_sasl``
mutates framer and SASL seeds at random for SEALBUS_FUZZ_SECONDS (default 10); a failing input is
saved as a ``crash-*`` corpus file. The coverage-guided runs are in tests/test_fuzz_atheris.py.
"""

import hashlib
import importlib
import os
import random
import time
from pathlib import Path

import pytest

from .fuzz import TARGETS, missing

CORPUS = Path(__file__).parent / "fuzz_corpus"
SECONDS = float(os.environ.get("SEALBUS_FUZZ_SECONDS", "10"))


def target(name: str):
    why = missing(name)
    if why:
        pytest.skip(f"target {name}: {why}")
    return importlib.import_module(f"tests.fuzz.{name}")


def corpus_cases():
    for name in TARGETS:
        for p in sorted((CORPUS / name).glob("*")):
            yield pytest.param(name, p, id=f"{name}/{p.name[:24]}")


@pytest.mark.parametrize(("name", "case"), list(corpus_cases()))
def test_corpus_regressions(name, case):
    target(name).TestOneInput(case.read_bytes())


def test_every_target_has_a_corpus():
    empty = [n for n in TARGETS if not any((CORPUS / n).glob("*"))]
    assert not empty, f"targets without seeds: {empty}"


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(5)
        if op == 0 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1 and b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 2:
            b.insert(rng.randrange(len(b) + 1), rng.randrange(256))
        elif op == 3 and b:
            del b[rng.randrange(len(b))]
        else:
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.choice([b"\xff\xff\xff\xff", b"\0\0\0\0", b"\x01", b"a{", b"(", b"\x80", b"\r\n"])
    return bytes(b)


def save_crash(name: str, data: bytes) -> Path:
    p = CORPUS / name / f"crash-{hashlib.sha256(data).hexdigest()[:16]}"
    p.write_bytes(data)
    return p


@pytest.mark.slow
@pytest.mark.timeout(SECONDS * 3 + 60)
def test_fuzz_framer_header_sasl():
    rng = random.Random(int(os.environ.get("SEALBUS_FUZZ_SEED", time.time_ns())))
    seeds = {n: [p.read_bytes() for p in sorted((CORPUS / n).glob("*"))] for n in ("framer", "sasl")}
    funcs = {n: target(n).TestOneInput for n in seeds}
    deadline = time.monotonic() + SECONDS
    runs = 0
    while time.monotonic() < deadline:
        name = "framer" if rng.random() < 0.8 else "sasl"
        data = mutate(rng, rng.choice(seeds[name]))
        try:
            funcs[name](data)
        except Exception as e:
            p = save_crash(name, data)
            pytest.fail(f"{name} target failed: {type(e).__name__}: {e} (saved {p})")
        runs += 1
    print(f"fuzz: {runs} inputs in {SECONDS:.0f}s, no crash")
