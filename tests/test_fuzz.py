"""Bounded mutation fuzzing of the framer, header parser and SASL machine.

Only WireError subclasses may escape. Runs SEALBUS_FUZZ_SECONDS (default 25)
in `make test`; `make fuzz` runs longer. A crashing input is saved under
tests/fuzz_corpus/ and replayed as a regression case from then on.
"""

import hashlib
import os
import random
import time
from pathlib import Path

import pytest

from broker.wire.errors import WireError
from broker.wire.framer import Framer
from broker.wire.message import build_message
from broker.wire.sasl import SaslServer

CORPUS = Path(__file__).parent / "fuzz_corpus"
SECONDS = float(os.environ.get("SEALBUS_FUZZ_SECONDS", "25"))
pytestmark = pytest.mark.slow  # each test fuzzes for SECONDS

SEEDS = [
    build_message(1, 1, path="/org/freedesktop/DBus", interface="org.freedesktop.DBus", member="Hello",
                  destination="org.freedesktop.DBus"),
    build_message(1, 2, path="/a", interface="org.x.I", member="M", destination=":1.4", signature="a{sv}(ayh)",
                  body=({"k": ("as", ["v"])}, (b"abc", 0)), unix_fds=1),
    build_message(4, 3, path="/s", interface="org.x.S", member="Sig", signature="v", body=(("v", ("i", 1)),),
                  endian="B"),
    build_message(3, 4, error_name="org.x.Err", reply_serial=9, signature="s", body=("boom",)),
]  # fmt: skip
SASL_SEEDS = [
    b"\0AUTH EXTERNAL 30\r\nNEGOTIATE_UNIX_FD\r\nBEGIN\r\n" + SEEDS[0],
    b"\0AUTH EXTERNAL\r\nDATA\r\nBEGIN\r\n" + SEEDS[1],
    b"\0AUTH EXTERNAL\r\nCANCEL\r\nAUTH EXTERNAL 30\r\nBEGIN\r\n",
]


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
            b[i:i] = rng.choice([b"\xff\xff\xff\xff", b"\0\0\0\0", b"\x01", b"a{", b"(", b"\x80"])
    return bytes(b)


def run_framer(data: bytes, rng: random.Random | None = None) -> None:
    f = Framer(max_message_size=1 << 20)
    try:
        pos = 0
        while pos < len(data):
            n = rng.randint(1, 64) if rng else len(data)
            # fake fd numbers: the framer only counts and attaches them
            for m in f.feed(data[pos : pos + n], fds=[-1, -1]):
                if m.header.signature:
                    m.header.unmarshal_body()
                m.header.forward_header(":1.1")
            pos += n
    except WireError:
        pass


def run_sasl(data: bytes) -> None:
    """Feed line by line, as a client would; after BEGIN the rest goes to a framer, as in the broker."""
    s = SaslServer(0, "0" * 32)
    lines = data.split(b"\n")
    try:
        for i, line in enumerate(lines):
            s.feed(line + b"\n" if i < len(lines) - 1 else line)
            if s.done:
                run_framer(s.leftover + b"\n".join(lines[i + 1 :]))
                break
    except WireError:
        pass


def save_crash(kind: str, data: bytes) -> Path:
    CORPUS.mkdir(exist_ok=True)
    p = CORPUS / f"{kind}-{hashlib.sha256(data).hexdigest()[:16]}"
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("case", sorted(CORPUS.glob("*")) if CORPUS.exists() else [], ids=lambda p: p.name)
def test_corpus_regressions(case):
    data = case.read_bytes()
    (run_sasl if case.name.startswith("sasl") else run_framer)(data)


@pytest.mark.timeout(SECONDS * 3 + 60)
def test_fuzz_framer_header_sasl():
    rng = random.Random(int(os.environ.get("SEALBUS_FUZZ_SEED", time.time_ns())))
    deadline = time.monotonic() + SECONDS
    runs = 0
    while time.monotonic() < deadline:
        if rng.random() < 0.8:
            seed = b"".join(rng.sample(SEEDS, rng.randint(1, len(SEEDS))))
            data = mutate(rng, seed)
            try:
                run_framer(data, rng)
            except Exception as e:
                p = save_crash("framer", data)
                pytest.fail(f"framer raised {type(e).__name__}: {e} (saved {p})")
        else:
            data = mutate(rng, rng.choice(SASL_SEEDS))
            try:
                run_sasl(data)
            except Exception as e:
                p = save_crash("sasl", data)
                pytest.fail(f"SASL raised {type(e).__name__}: {e} (saved {p})")
        runs += 1
    print(f"fuzz: {runs} inputs in {SECONDS:.0f}s, no crash")
