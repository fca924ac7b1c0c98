"""Instructions per broker hop, counted by valgrind: a measure the shared machine's load cannot move.

    .venv/bin/python -m benchmarks.hop_ir [--pure | --compiled]   # both builds by default

Runs the in-process hop of :mod:`benchmarks.hop_micro` (call and reply, warm
caches) N times and 0 times under callgrind, once per build (compiled, then
``SEALBUS_PURE_PYTHON=1``), and prints the difference divided by N: the
instructions one call hop plus one reply hop execute, syscalls' user-space
side included, the kernel's work not. Takes about a minute per build.
"""

import os
import re
import subprocess
import sys
import tempfile

N = 2000
WARMUP = 300


def _loop(n: int) -> None:
    from benchmarks.hop_micro import Rig, drain
    from broker.wire.message import build_message

    rig = Rig()
    client_name = rig.client.peer.unique_name

    def pair(i):
        call = build_message(1, 10 + i, path="/org/bench/Server", interface="org.bench.Server", member="Ping",
                             destination="org.bench.Server", signature="ay", body=(b"x" * 16,))  # fmt: skip
        reply = build_message(2, 10 + i, reply_serial=10 + i, destination=client_name, signature="ay",
                              body=(b"x" * 16,))  # fmt: skip
        return call, reply

    msgs = [pair(i) for i in range(WARMUP + N)]  # as many built whatever n is: building is not counted
    for call, reply in msgs[: WARMUP + n]:
        rig.client_end.send(call)
        rig.hop(rig.client)
        drain(rig.service_end)
        rig.service_end.send(reply)
        rig.hop(rig.service)
        drain(rig.client_end)


def instructions(n: int, pure: bool) -> int:
    env = dict(os.environ, SEALBUS_PURE_PYTHON="1" if pure else "")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-m",
               "benchmarks.hop_ir", "--loop", str(n)]  # fmt: skip
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        m = re.search(r"Collected : (\d+)", r.stderr)
        return int(m.group(1))


def main() -> None:
    if sys.argv[1:2] == ["--loop"]:
        _loop(int(sys.argv[2]))
        return
    builds = {"--pure": (True,), "--compiled": (False,)}.get(sys.argv[1] if sys.argv[1:] else "", (False, True))
    for pure in builds:
        base = instructions(0, pure)
        full = instructions(N, pure)
        build = "pure Python" if pure else "compiled (if built)"
        print(f"{build:24s} {(full - base) / N:10.0f} instructions per call hop + reply hop")


if __name__ == "__main__":
    main()
