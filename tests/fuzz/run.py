"""Run fuzz targets under atheris.

    python -m tests.fuzz.run TARGET [libFuzzer flags] [corpus dirs]   one target, in this process
    python -m tests.fuzz.run [--seconds N] [--runs N] [--only a,b] [--work DIR] [--merge]
        every target (default SEALBUS_FUZZ_SECONDS each), one after the other in subprocesses,
        then the table: inputs executed, coverage (libFuzzer's cov/ft), crashes

libFuzzer owns the process it runs in (it exits on a crash), so a target always runs in a process of
its own. New inputs go to a scratch corpus directory first; tests/fuzz_corpus/<target>/ is only read
(``--merge`` folds the scratch inputs that add coverage back into it, minimised).
"""

import argparse
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import broker

from . import SCRATCH_ENV, TARGETS, scratch_dir

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "fuzz_corpus"
_STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+)", re.M)
_EXECUTED = re.compile(r"stat::number_of_executed_units: (\d+)")
_SHA1_NAME = re.compile(r"[0-9a-f]{40}")
_DONE = re.compile(r"^Done (\d+) runs in (\d+) second", re.M)


def load_target(name: str):
    """The target module, its broker imports instrumented for coverage (when atheris is there)."""
    if name not in TARGETS:
        raise SystemExit(f"unknown target {name!r}: one of {', '.join(TARGETS)}")
    import atheris

    # atheris instruments Python bytecode only: a compiled hot-path module would give no coverage
    os.environ[broker.PURE_ENV] = "1"
    with atheris.instrument_imports(include=["broker"]):
        # broker's finder picks a hot module's .py over its extension; ahead of atheris's finder (where
        # it sits) it also bypassed the instrumenting loader: framer, header view and body validator
        # ran uninstrumented. Behind it, atheris asks it for the spec and instruments what it returns.
        sys.meta_path.remove(broker._HotPathFinder)
        sys.meta_path.insert(sys.meta_path.index(_atheris_finder()) + 1, broker._HotPathFinder)
        return importlib.import_module(f"tests.fuzz.{name}")


def _atheris_finder():
    from atheris.import_hook import AtherisMetaPathFinder

    return next(f for f in sys.meta_path if isinstance(f, AtherisMetaPathFinder))


def fuzz_in_process(name: str, args: list[str]) -> None:
    import atheris

    module = load_target(name)
    # libFuzzer runs argv[0] through the shell for -merge=1 (and -fork): make it this very command
    argv0 = f"{shlex.quote(sys.executable)} -m tests.fuzz.run {name}"
    atheris.Setup([argv0, *args], module.TestOneInput)
    atheris.Fuzz()


def run_target(name: str, seconds: float, work: Path, *, runs: int | None = None, timeout: int = 10, extra=()) -> dict:
    """Fuzz ``name`` for ``seconds`` in a subprocess (seeded from its corpus); its stats and crashes."""
    scratch = work / name / "new"
    artifacts = work / name / "artifacts"
    scratch.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    seeds = CORPUS / name
    cmd = [sys.executable, "-m", "tests.fuzz.run", name, f"-max_total_time={max(1, int(seconds))}",
           f"-timeout={timeout}", "-rss_limit_mb=2048", "-print_final_stats=1", f"-artifact_prefix={artifacts}/",
           *([f"-runs={runs}"] if runs else []), *extra, str(scratch), *([str(seeds)] if seeds.is_dir() else [])]  # fmt: skip
    files = scratch_dir(f"sealbus-fuzz-{name}-")
    log_path = work / name / "log"  # written as it runs: a long run can be watched (tail -f)
    try:
        with open(log_path, "wb") as log_file:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                  env={**os.environ, SCRATCH_ENV: files}, timeout=seconds * 2 + 120)  # fmt: skip
    finally:
        shutil.rmtree(files, ignore_errors=True)
    log = log_path.read_text(errors="replace")
    status = _STATUS.findall(log)
    executed = _EXECUTED.search(log) or _DONE.search(log)
    done = _DONE.search(log)
    return {
        "target": name,
        "inputs": int(executed.group(1)) if executed else int(status[-1][0]) if status else 0,
        "seconds": int(done.group(2)) if done else None,
        "cov": int(status[-1][1]) if status else 0,
        "ft": int(status[-1][2]) if status else 0,
        "crashes": sorted(str(p) for p in artifacts.iterdir()),
        "returncode": proc.returncode,
        "log": log,
        "scratch": scratch,
    }


def merge_into_corpus(name: str, scratch: Path) -> None:
    """Fold the inputs of ``scratch`` that add coverage into tests/fuzz_corpus/<name>/ (libFuzzer -merge=1),
    minimising the unnamed (sha1) inputs; named files (``crash-*``, ``regression-*``) always stay."""
    seeds = CORPUS / name
    merged = Path(tempfile.mkdtemp(prefix=f"merge-{name}-"))
    subprocess.run([sys.executable, "-m", "tests.fuzz.run", name, "-merge=1", str(merged), str(seeds), str(scratch)],
                   cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    for p in seeds.iterdir():
        if _SHA1_NAME.fullmatch(p.name):
            p.unlink()
    for p in merged.iterdir():
        shutil.copy(p, seeds / p.name)
    shutil.rmtree(merged)


def table(rows: list[dict]) -> str:
    out = ["| target | inputs | seconds | cov | ft | crashes |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    out += [f"| {r['target']} | {r['inputs']:,} | {r['seconds']} | {r['cov']} | {r['ft']} | {len(r['crashes'])} |"
            for r in rows]  # fmt: skip
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if argv and not argv[0].startswith("-"):
        fuzz_in_process(argv[0], argv[1:])
        return 0
    p = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=float(os.environ.get("SEALBUS_FUZZ_SECONDS", "300")))
    p.add_argument("--runs", type=int, help="stop a target after this many inputs (libFuzzer -runs)")
    p.add_argument("--only", default=",".join(TARGETS), help="comma-separated targets")
    p.add_argument("--work", help="keep scratch corpora, logs and crashes here (default: a temporary dir)")
    p.add_argument("--merge", action="store_true", help="fold new coverage into tests/fuzz_corpus/ afterwards")
    p.add_argument("--timeout", type=int, default=10,
                   help="seconds one input may take before it counts as a hang (libFuzzer -timeout, wall time: "
                        "on a loaded machine a niced run can be starved that long, so give long runs more)")  # fmt: skip
    a = p.parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="sealbus-fuzz-"))
    rows = []
    for name in a.only.split(","):
        r = run_target(name, a.seconds, work, runs=a.runs, timeout=a.timeout)
        rows.append(r)
        print(f"{name}: {r['inputs']:,} inputs, cov {r['cov']} ft {r['ft']}, {len(r['crashes'])} crashes", flush=True)
        for c in r["crashes"]:
            print(f"  crash: {c}")
        if a.merge and not r["crashes"]:
            merge_into_corpus(name, r["scratch"])
    print(table(rows))
    print(f"logs, scratch corpora and crashes: {work}")
    return 1 if any(r["crashes"] or r["returncode"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
