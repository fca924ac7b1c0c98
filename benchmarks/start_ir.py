"""Instructions from exec to the first answered Hello, counted by valgrind: start-up measured by a count
the shared machine's load cannot move (wall and CPU time moved by x2 between runs here).

    .venv/bin/python -m benchmarks.start_ir                 # sealbus-dbus-daemon, then the references
    .venv/bin/python -m benchmarks.start_ir --tree DIR ...  # another tree's broker/ (PYTHONPATH=DIR)

Each line: callgrind's instruction total for one start of the bus (the same session-like config file as
benchmarks/startup.py, AUTH EXTERNAL + Hello answered, then SIGTERM: a clean exit, so shutdown is
counted too), and for reference the interpreter alone and ``import trio``, which bound what sealbus's own
start-up can save. A tree given with --tree needs its bytecode compiled (``python -m compileall``):
with PYTHONDONTWRITEBYTECODE set, a tree without .pyc files is compiled again at every start.
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

from benchmarks import run_bench as rb
from benchmarks import startup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = os.path.join(ROOT, ".venv", "bin", "python")


def callgrind_total(argv: list[str], env: dict, until_hello: str | None = None) -> int:
    """Instructions of ``argv`` under callgrind; with ``until_hello`` (a socket path), once a Hello on it
    was answered the process gets SIGTERM."""
    with tempfile.TemporaryDirectory(prefix="start-ir.") as d:
        out = os.path.join(d, "cg.out")
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv]
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        if until_hello:
            deadline = time.monotonic() + 300
            with startup._connect(until_hello, proc, deadline) as s:
                s.sendall(startup.hello_bytes())
                startup._await_reply(s, deadline)
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
        with open(out) as f:
            for line in f:
                if line.startswith("summary:"):
                    return int(line.split()[1])
    raise RuntimeError("no callgrind summary")


def sealbus_start(tree: str | None) -> int:
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = tree
    with tempfile.TemporaryDirectory(prefix="start-ir-bus.") as d:
        sock, conf = os.path.join(d, "bus"), os.path.join(d, "bus.conf")
        with open(conf, "w") as f:
            f.write(rb.bus_config(sock, {}))
        argv = [PYTHON, startup.SEALBUS_DAEMON, "--config-file=" + conf, "--nofork", "--print-address=1"]
        return callgrind_total(argv, env, until_hello=sock)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.start_ir", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--tree", action="append", default=[], help="a source tree holding broker/ (repeatable)")
    a = p.parse_args(argv)
    rows = [(f"sealbus start to Hello ({t or 'this checkout'})", sealbus_start(t or None)) for t in a.tree or [""]]
    env = dict(os.environ)
    rows.append(("interpreter alone (python -c pass)", callgrind_total([PYTHON, "-c", "pass"], env)))
    rows.append(("import trio", callgrind_total([PYTHON, "-c", "import trio"], env)))
    for label, n in rows:
        print(f"{n / 1e6:9.1f} M instructions  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
