"""`make bench`: sealbus vs dbus-daemon vs dbus-broker, one interleaved run.

One load generator for every broker: dbench (C, sd-bus; benchmarks/dbench),
driven by benchmarks/run_bench.py, which starts a fresh broker per
(benchmark, target, rep) and interleaves targets (A B C, then C B A, ...).
This module chooses the benchmarks, runs them, keeps the raw JSON, and
renders docs/benchmarks.md plus two PNG plots next to it.

    .venv/bin/python -m benchmarks.run --md docs/benchmarks.md      # full, ~8 min
    .venv/bin/python -m benchmarks.run --quick --md /tmp/b.md       # ~1 min
    .venv/bin/python -m benchmarks.run --render benchmarks/results/latest.json --md docs/benchmarks.md

Ratios are medians of per-rep paired ratios (both numbers measured back to
back in the same rep), because this machine is shared and noisy.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

from benchmarks import run_bench as rb

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SEALBUS = os.path.join(ROOT, ".venv", "bin", "sealbus")
SEALBUS_CMD = SEALBUS + " run --address unix:path={path}"
# the same bus with adaptive busy polling off, for the round-trip rows only: what the polling buys
NOPOLL = "sealbus-nopoll"
NOPOLL_ONLY = "ping"
BASES = ("dbus-daemon", "dbus-broker")
FULL_SKIP = "fanout_n10$,idle_1000$"
QUICK_ONLY = "ping_k1$,oneway,fanout_n100,large_ay_1K,large_ay_1M,large_fd_1K,large_fd_1M,large_fd_16M,idle_1000"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
# (bench id, metric key, short label) for the throughput plot
RATE_ROWS = (("ping_k1", "calls_per_s", "Ping K=1\ncalls/s"),
             ("ping_k4", "calls_per_s", "Ping K=4\ncalls/s"),
             ("ping_k1_d16", "calls_per_s", "Ping depth 16\ncalls/s"),
             ("oneway", "msgs_per_s", "one-way\nmsgs/s"),
             ("fanout_n100", "deliveries_per_s", "fan-out N=100\ndeliveries/s"),
             ("idle_5000", "rss_after_kb", "5000 idle conns\nRSS KiB (lower=better)"),
             ("idle_1000", "rss_after_kb", "1000 idle conns\nRSS KiB (lower=better)"))  # fmt: skip


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sealbus_starts(cmd: str) -> str | None:
    """Start the sealbus command once; None if it serves a bus, else why not (so one
    broken build costs seconds, not a 30 s timeout per benchmark)."""
    with tempfile.TemporaryDirectory(prefix="sealbus-preflight.") as wd:
        try:
            inst = rb.CommandInstance(wd, None, [], cmd)
        except (RuntimeError, OSError) as e:
            return str(e)[-300:]
        inst.stop()
    return None


def machine() -> dict:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    rev = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True)
    return {"cpu": cpu, "mem_gib": round(mem_kb / 2**20, 1), "sealbus_rev": rev.stdout.strip() or "?"}


def run(a) -> dict:
    targets = list(a.targets)
    notes = []
    if "sealbus" in targets:
        why = sealbus_starts(a.sealbus_cmd)
        if why:
            log("sealbus does not start, measuring without it: " + why)
            notes.append(f"sealbus was left out of this run: it did not start (`{why.strip()[-200:]}`).")
            targets.remove("sealbus")
    cmd = [sys.executable, os.path.join(HERE, "run_bench.py"), "--no-limits-probe",
           *[t for t in targets if t != "sealbus"]]  # fmt: skip
    if "sealbus" in targets:
        cmd += ["--start", "sealbus", a.sealbus_cmd]
        if not a.quick:
            cmd += ["--start", NOPOLL, a.sealbus_cmd.replace(" run ", " run --busy-poll 0 ", 1),
                    "--only-for", f"{NOPOLL}={NOPOLL_ONLY}"]  # fmt: skip
    if a.quick:
        cmd += ["--reps", "1", "--scale", "0.1", "--only", a.only or QUICK_ONLY]
    else:
        cmd += ["--reps", str(a.reps), "--scale", str(a.scale)]
        cmd += ["--only", a.only] if a.only else ["--skip", FULL_SKIP]
    cmd, startup = _startup_wanted(cmd, a)
    shown = shlex.join(["benchmarks/run_bench.py", *cmd[2:]]).replace(ROOT + "/", "")
    with tempfile.TemporaryDirectory(prefix="sealbus-bench.") as wd:
        raw = os.path.join(wd, "raw.json")
        cmd += ["--json", raw, "--md", os.path.join(wd, "raw.md")]
        log("+ " + shlex.join(cmd))
        subprocess.run(cmd, check=True, cwd=HERE, stdout=subprocess.DEVNULL)
        with open(raw) as f:
            d = json.load(f)
    if not a.quick:
        log("+ python -m benchmarks.wire_micro")
        wm = subprocess.run([sys.executable, "-m", "benchmarks.wire_micro"], cwd=ROOT, capture_output=True, text=True)
        d["wire_micro"] = wm.stdout.splitlines() if wm.returncode == 0 else ["failed: " + wm.stderr[-300:]]
        log("+ python -m benchmarks.hop_micro")
        hm = subprocess.run([sys.executable, "-m", "benchmarks.hop_micro"], cwd=ROOT, capture_output=True, text=True)
        d["hop_micro"] = hm.stdout.splitlines() if hm.returncode == 0 else ["failed: " + hm.stderr[-300:]]
    if startup:
        d["startup"] = run_startup(targets, 1 if a.quick else STARTUP_STARTS)
        shown += f" (and python -m benchmarks.startup --starts {d['startup']['starts']})"
    d["meta"].update(machine())
    d["meta"]["quick"] = a.quick
    d["meta"]["command"] = shown
    d["meta"]["notes"] = notes
    return d


STARTUP = "startup"  # the start-up row (benchmarks/startup.py); an --only token, not a run_bench.py id
STARTUP_STARTS = 20


def _startup_wanted(cmd: list, a) -> tuple[list, bool]:
    """Whether this run measures start-up (full runs, or --only naming it), and run_bench's command without it."""
    if "--only" not in cmd:
        return cmd, not a.quick
    i = cmd.index("--only") + 1
    ids = cmd[i].split(",")
    if STARTUP not in ids:
        return cmd, False
    rest = [x for x in ids if x != STARTUP]
    return cmd[:i] + [",".join(rest) or "none$"] + cmd[i + 1 :], True


def run_startup(targets: list, starts: int) -> dict:
    from benchmarks import startup

    which = [t for t in startup.TARGETS if t in targets]
    log(f"+ python -m benchmarks.startup --starts {starts} --targets {','.join(which)}")
    return startup.measure([t for t in which if startup.available(t)], starts)


# ------------------------------------------------------------------ render


def _runs(res: dict, bid: str, target: str) -> list:
    return res.get((bid, target), [])


def _vals(runs: list, key: str) -> list:
    return [r[key] for r in runs if r.get("_ok") and r.get(key) is not None]


def paired(res: dict, bid_a: str, ta: str, bid_b: str, tb: str, key: str) -> list:
    """Per-rep ratios a/b of runs measured in the same rep."""
    out = []
    for x, y in zip(_runs(res, bid_a, ta), _runs(res, bid_b, tb), strict=False):
        if x.get("_ok") and y.get("_ok") and x.get(key) is not None and y.get(key):
            out.append(x[key] / y[key])
    return out


def fmt_ratio(rs: list) -> str:
    if not rs:
        return "—"
    s = f"x{statistics.median(rs):.2f}" if statistics.median(rs) < 100 else f"x{statistics.median(rs):.0f}"
    if len(rs) > 1:
        s += f" [{min(rs):.2f}\u2013{max(rs):.2f}]"
    return s


def fmt_cell(runs: list, key: str, f: str) -> str:
    vals = _vals(runs, key)
    if not runs:
        return "n/a"
    cell = rb.fmt(statistics.median(vals), f) if vals else "—"
    if len(vals) > 1:
        cell += f" [{rb.fmt(min(vals), f)}\u2013{rb.fmt(max(vals), f)}]"
    bad = [r for r in runs if not r.get("_ok")]
    if bad:
        why = sorted({(r.get("_error") or "failed")[:80].replace("|", "/") for r in bad})
        cell += f" ({len(bad)}/{len(runs)} failed: {'; '.join(why)})"
    return cell


def ratio_columns(targets: list) -> list:
    cols = []
    if "sealbus" in targets:
        cols += [("sealbus", b) for b in BASES if b in targets]
    if NOPOLL in targets and "dbus-daemon" in targets:
        cols.append((NOPOLL, "dbus-daemon"))
    if all(b in targets for b in BASES):
        cols.append(("dbus-broker", "dbus-daemon"))
    return cols


def headline(res: dict, targets: list, d_startup: dict | None = None) -> list:
    """The issue targets, each as measured in this run."""
    L = []
    if "sealbus" not in targets:
        return ["sealbus was not measured in this run, so the targets are not evaluated."]

    def row(what, goal, rs, ok):
        verdict = "—" if not rs else ("met" if ok(statistics.median(rs)) else "**not met**")
        L.append(f"| {what} | {goal} | {fmt_ratio(rs)} | {verdict} |")

    L += ["| target | goal | measured (sealbus / reference, paired median [min\u2013max]) | |", "|---|---|---|---|"]
    for bid, key, what in (("ping_k1", "calls_per_s", "method-call round trips, 1 client"),
                           ("ping_k4", "calls_per_s", "method-call round trips, 4 clients"),
                           ("oneway", "msgs_per_s", "one-way messages"),
                           ("fanout_n100", "deliveries_per_s", "100-subscriber fan-out")):  # fmt: skip
        row(
            what + " vs dbus-daemon",
            "≥ x1.00",
            paired(res, bid, "sealbus", bid, "dbus-daemon", key),
            lambda m: m >= 1.0,
        )
    for bid, what in (("ping_k1", "1 client"), ("ping_k4", "4 clients"), ("ping_k1_d16", "1 client, depth 16")):
        rs = paired(res, bid, NOPOLL, bid, "dbus-daemon", "calls_per_s")
        if rs:
            L.append(
                f"| for reference: round trips, {what}, busy polling off (`--busy-poll 0`) vs dbus-daemon "
                f"| (no goal) | {fmt_ratio(rs)} | |"
            )
    row(
        "RSS with 5000 idle connections vs dbus-daemon",
        "≤ x2.00",
        paired(res, "idle_5000", "sealbus", "idle_5000", "dbus-daemon", "rss_after_kb"),
        lambda m: m <= 2.0,
    )
    rs = paired(res, "large_ay_64M", "dbus-broker", "large_fd_64M", "sealbus", "transit_med_ms")
    row("64 MiB transit: dbus-broker `ay` / sealbus sealed memfd", "≥ x100", rs, lambda m: m >= 100)
    rs = paired(res, "large_fd_1G", "sealbus", "large_fd_1K", "sealbus", "transit_med_ms")
    row("sealbus memfd transit, 1 GiB / 1 KiB (flat)", "≈ x1 (≤ x3 counted as flat)", rs, lambda m: m <= 3.0)
    for ref in BASES:  # the same ratio for the C brokers: what the kernel side costs
        rs = paired(res, "large_fd_1G", ref, "large_fd_1K", ref, "transit_med_ms")
        if rs:
            L.append(f"| for reference: {ref} memfd transit, 1 GiB / 1 KiB | (no goal) | {fmt_ratio(rs)} | |")
    if d_startup is not None:
        from benchmarks import startup

        rs = startup.paired_ratios(d_startup, "sealbus", "dbus-daemon")
        row("start-up, exec to the first answered call (wall) vs dbus-daemon", "≤ x2.00", rs, lambda m: m <= 2.0)
        rs = startup.paired_ratios(d_startup, "sealbus", "dbus-daemon", "cpu_ms")
        if rs:
            L.append(f"| for reference: start-up, the bus's CPU time to that answer, vs dbus-daemon | (no goal) "
                     f"| {fmt_ratio(rs)} | |")  # fmt: skip
    L += ["", "Passing an fd is O(1) in every broker, yet memfd transit rises with size for the C brokers too "
          "(reference rows): part of the size-dependent cost is outside the broker (sender and receiver "
          "processes and the kernel, on 2 shared cores, right after filling the payload). Compare the absolute "
          "sealbus-minus-dbus-broker difference per size in the table below for the broker's own share."]  # fmt: skip
    return L


def render(d: dict) -> str:
    meta = d["meta"]
    targets = [t["label"] for t in d["targets"]]
    res = {(r["bench"], r["target"]): r["runs"] for r in d["results"]}
    benches = [b for b in rb.make_benches(meta.get("scale", 1.0)) if any((b.id, t) in res for t in targets)]
    cols = ratio_columns(targets)
    L = ["# Benchmarks", "",
         "Generated by `make bench` (`python -m benchmarks.run`); raw data: `benchmarks/results/latest.json`; "
         "re-render with `python -m benchmarks.run --render benchmarks/results/latest.json`.", ""]  # fmt: skip
    if meta.get("quick"):
        L += ["**Quick run** (`--quick`: 1 rep, scaled-down counts, subset of rows): for iterating, not for "
              "quoting.", ""]  # fmt: skip
    L += ["Machine: {}; {}, {} GiB RAM, shared with other work (load average {} at start, {} at end). "
          "Measured {}; sealbus {}; {}.".format(meta.get("host"), meta.get("cpu"), meta.get("mem_gib"),
                                            meta.get("load_start"), meta.get("load_end"), meta.get("date"),
                                            meta.get("sealbus_rev"), ", ".join(meta.get("versions", {}).values())),
          ""]  # fmt: skip
    L += ["- " + n for n in meta.get("notes", [])]
    L += ["## Targets", ""] + headline(res, targets, d.get("startup")) + [""]
    L += ["## Method", "",
          "* **One load generator for all brokers**: `dbench` (C, sd-bus), in `benchmarks/dbench/`. Only the "
          "bus address differs. Its server process owns `org.bench.Server` and answers `Ping(ay)`, `Sink(ay)`, "
          "`Blob(ay)` and `BlobFd(h)`. Against a direct peer socket (no broker) it does several times the "
          "brokers' rates, so the brokers are the bottleneck.",
          "* **Fresh broker per run, interleaved**: every (benchmark, broker, rep) starts a new broker and "
          "server; the broker order alternates per rep. No CPU pinning: broker, server and clients share the "
          "2 cores. dbus-daemon and dbus-broker get raised limits (session-like); sealbus runs as "
          "`sealbus run --address unix:path=…` (allow-all policy, fd mode `any`, adaptive busy polling at its "
          "default maximum of 50 µs). `sealbus-nopoll` is the same bus with `--busy-poll 0`, measured in the "
          "round-trip rows only, to show what the polling buys and costs (its broker CPU per call).",
          "* **Cells**: median over reps, `[min\u2013max]` over reps. **Ratios**: the median of per-rep ratios of two "
          "brokers measured in the same rep, `[min\u2013max]` of those ratios. For rates >1 is better; for "
          "times, latency and memory <1 is better.",
          "* **Ping**: K client processes, each one synchronous call at a time (or 16 outstanding for "
          "'pipelined'), for a fixed duration after a warm-up. **One-way**: `Sink(ay16)` with "
          "NO_REPLY_EXPECTED as fast as the socket takes them; rate = messages the receiver counted / time to "
          "the final `SinkDone` reply. **Fan-out**: 100 subscriber processes with a match rule on one "
          "signal; a burst of M signals; deliveries/s = 100·M / time until the last subscriber has the last "
          "one. **Idle**: one process opens the connections (each `Hello`) and holds them; the broker's "
          "VmRSS after 0.5 s (dbus-broker: the `dbus-broker` process, not its launcher).",
          "* **Large payloads / transit time**: from *payload ready at the sender* (`ay`: the bytes are in the "
          "sender's memory, before sd-bus builds the message, so the copy into the message counts; memfd: "
          "`memfd_create` + write + the four seals already done) until *the receiver holds a readable view* "
          "(`ay`: sd-bus hands the receiver the complete message; memfd: `mmap(PROT_READ)` of the received fd "
          "returned). Both clocks are CLOCK_MONOTONIC on the same host. The receiver checksums the payload "
          "and the sender verifies it, but only after the receiver's timestamp, so no hashing is inside "
          "transit. 'ms/transfer' is the whole call (build, send, receive, checksum, reply). `ay` stops at "
          "64 MiB, the spec's array limit.", ""]  # fmt: skip
    L += ["## Results", "", "![throughput](benchmarks-throughput.png)", "",
          "![transit](benchmarks-transit.png)", ""]  # fmt: skip
    hdr = "| benchmark | metric | " + " | ".join(targets) + "".join(" | {}/{}".format(*c) for c in cols) + " |"
    L += [hdr, "|" + "---|" * (2 + len(targets) + len(cols))]
    for b in benches:
        for key, label, _hib, f in rb.metric_rows(b.id):
            cells = [fmt_cell(_runs(res, b.id, t), key, f) for t in targets]
            cells += [fmt_ratio(paired(res, b.id, x, b.id, y, key)) for x, y in cols]
            L.append("| {} | {} | {} |".format(b.title, label, " | ".join(cells)))
    if d.get("startup"):
        from benchmarks import startup

        L += ["", "## Start-up", "",
              "`python -m benchmarks.startup`: exec of each bus with the same session-like config file (sealbus "
              "through its dbus-daemon drop-in, `sealbus-dbus-daemon --config-file=… --nofork --print-address`) to "
              "the reply to `Hello` on a connection made as soon as the socket accepts; rounds interleave the "
              "targets. dbus-broker starts under `benchmarks/dbus-broker-wrap`, a Python wrapper standing in for "
              "systemd, whose own start is included. Median [min\u2013max] over rounds.", "",
              *startup.table(d["startup"])]  # fmt: skip
    if d.get("wire_micro"):
        L += ["", "## Wire layer micro-benchmark", "",
              "`python -m benchmarks.wire_micro`: header parse + SENDER rewrite of one message in a loop, in "
              "sealbus's own process (no sockets); 'cold cache' clears the header-field cache each time.", "",
              "```", *d["wire_micro"], "```"]  # fmt: skip
    if d.get("hop_micro"):
        L += ["", "## One broker hop, in-process", "",
              "`python -m benchmarks.hop_micro`: the real Server, Connection and Bus route a `Ping(ay16)` call and "
              "its reply over socketpairs, driven directly (warm caches, no epoll, no peer to wake): the "
              "broker's own cost per message, against the bare syscalls.", "",
              "```", *d["hop_micro"], "```"]  # fmt: skip
    L += ["", f"Run: `{meta.get('command', '?')}`", ""]
    return "\n".join(L)


# ------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _median(res, bid, t, key):
    v = _vals(_runs(res, bid, t), key)
    return statistics.median(v) if v else None


def plot_transit(d: dict, path: str) -> None:
    """Transit time vs payload size, log-log, `ay` dashed and memfd solid per broker."""
    plt = _plt()
    res = {(r["bench"], r["target"]): r["runs"] for r in d["results"]}
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, t in enumerate(x["label"] for x in d["targets"]):
        color = f"C{i}"
        for kind, sizes, style in (("ay", rb.LARGE_AY, "--o"), ("fd", rb.LARGE_FD, "-s")):
            pts = [(rb.size_bytes(sz), _median(res, f"large_{kind}_{sz}", t, "transit_med_ms"))
                   for sz, _ in sizes]  # fmt: skip
            pts = [p for p in pts if p[1]]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color,
                        label="{}, {}".format(t, "ay (bytes)" if kind == "ay" else "sealed memfd"))  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = [KiB, 64 * KiB, MiB, 16 * MiB, 64 * MiB, 256 * MiB, GiB]
    ax.set_xticks(ticks, ["1 KiB", "64 KiB", "1 MiB", "16 MiB", "64 MiB", "256 MiB", "1 GiB"])
    ax.set_xlabel("payload size")
    ax.set_ylabel("transit time, ms (median)")
    ax.set_title("Payload ready at sender → readable view at receiver")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_throughput(d: dict, path: str) -> None:
    """One small bar chart per rate (and idle RSS), brokers side by side."""
    plt = _plt()
    res = {(r["bench"], r["target"]): r["runs"] for r in d["results"]}
    targets = [x["label"] for x in d["targets"]]
    rows = [r for r in RATE_ROWS if any(_median(res, r[0], t, r[1]) for t in targets)]
    if not rows:
        return
    fig, axes = plt.subplots(1, len(rows), figsize=(2.3 * len(rows) + 1, 3.8), squeeze=False)
    for ax, (bid, key, label) in zip(axes[0], rows, strict=True):
        ys = [_median(res, bid, t, key) or 0 for t in targets]
        bars = ax.bar(range(len(targets)), ys, color=[f"C{i}" for i in range(len(targets))])
        ax.set_xticks(range(len(targets)), targets, rotation=30, fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        for bar, y in zip(bars, ys, strict=True):
            ax.annotate(f"{y:,.0f}", (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom",
                        fontsize=7)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(d: dict, md_path: str) -> None:
    docs = os.path.dirname(os.path.abspath(md_path))
    stem = os.path.splitext(os.path.basename(md_path))[0]
    plot_transit(d, os.path.join(docs, stem + "-transit.png"))
    plot_throughput(d, os.path.join(docs, stem + "-throughput.png"))
    text = render(d).replace("(benchmarks-", f"({stem}-")
    with open(md_path, "w") as f:
        f.write(text)
    log(f"wrote {md_path} and {os.path.join(docs, stem)}-{{transit,throughput}}.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--md",
        default=os.path.join(ROOT, "docs", "benchmarks.md"),
        help="markdown report; the PNGs go next to it (default docs/benchmarks.md)",
    )
    p.add_argument("--json", default=os.path.join(HERE, "results", "latest.json"), help="raw results")
    p.add_argument(
        "--reps",
        type=int,
        default=5,
        help="repetitions per (benchmark, broker): medians need several on a shared machine",
    )
    p.add_argument("--scale", type=float, default=0.5, help="scale dbench message counts and durations")
    p.add_argument("--quick", action="store_true", help="1 rep, scaled-down counts, a subset of rows")
    p.add_argument("--only", help="comma-separated benchmark id prefixes (see run_bench.py)")
    p.add_argument("--targets", default="dbus-daemon,dbus-broker,sealbus", type=lambda s: s.split(","))
    p.add_argument("--sealbus-cmd", default=SEALBUS_CMD, help="({path} = socket path)")
    p.add_argument("--render", metavar="JSON", help="only re-render the report from a saved JSON")
    a = p.parse_args(argv)
    if a.render:
        with open(a.render) as f:
            d = json.load(f)
    else:
        d = run(a)
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(d, f, indent=1)
        log("wrote " + a.json)
    write_outputs(d, a.md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
