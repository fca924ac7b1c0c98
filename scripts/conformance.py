#!/usr/bin/env python3
"""Run the reference implementation's own bus tests against dbus-daemon and sealbus, case by case.

Debian's ``dbus-tests`` package installs dbus-daemon's test programs under
/usr/lib/dbus-1.0/installed-tests/dbus/ (GLib test programs speaking TAP, plus
a few shell scripts). Each program starts "a dbus-daemon" itself through
``$DBUS_TEST_DAEMON``; pointing that variable at ``sealbus-dbus-daemon`` runs
the same cases against sealbus. A GLib test program stops at its first failed
assertion, so every case runs in a process of its own (``-p CASE``): one
failure cannot hide the cases after it.

The verdict compares the two daemons: every case dbus-daemon passes must pass
on sealbus, and a case dbus-daemon skips may be skipped. Cases sealbus does not
pass yet are listed, with their cause, in ``scripts/conformance-known.txt``;
the run fails on a failure missing from that list and on a listed case that
passes now (the list can only shrink). ``--md`` writes the per-case table.

    scripts/conformance.py --sealbus .venv/bin/sealbus-dbus-daemon --md docs/conformance.md
    scripts/conformance.py --user nobody ...     # the same, as an unprivileged user
"""

import argparse
import concurrent.futures
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path("/usr/lib/dbus-1.0/installed-tests/dbus")
ROOT = Path(__file__).resolve().parent.parent
KNOWN = ROOT / "scripts" / "conformance-known.txt"

INSTALLED = Path("/usr/share/installed-tests/dbus")  # one .test file per installed test (Exec= its program)

# The programs that start a message bus through $DBUS_TEST_DAEMON, run case by case (a .sh runs whole).
BUS_PROGRAMS = [
    "test-dbus-daemon",
    "test-dbus-daemon-eavesdrop",
    "test-monitor",
    "test-sd-activation",
    "test-fdpass",
    "test-uid-permissions",
    "test-containers",
    "test-corrupt",
    "test-relay",
    "test-header-fields",
    "test-refs",
    "test-dbus-daemon-fork.sh",
    # as root with AppArmor on, loads the tests' AppArmor profiles and runs test-apparmor-activation
    # (the AppArmor policy of a bus); elsewhere it skips as a whole
    "test-apparmor-activation.sh",
]

# Tests of "the" session bus at $XDG_RUNTIME_DIR/bus: the runner starts one (--session) for each run.
SESSION_PROGRAMS = ["integration/transient-services.sh"]
SESSION = "(session)"  # the work item of a SESSION_PROGRAMS program

# Installed tests that test libdbus (or the daemon's code linked in) alone: they start no bus and give the
# same result whatever $DBUS_TEST_DAEMON is, so they are not run.
LIBDBUS_ONLY = ["test-assertions", "test-atomic", "test-desktop-file", "test-hash", "test-loopback",
                "test-marshal", "test-message", "test-misc-internals", "test-printf", "test-server-oom",
                "test-shell", "test-syntax", "test-sysdeps", "test-syslog", "test-userdb", "test-variant"]  # fmt: skip


def installed_tests() -> list[str]:
    """The programs of the installed tests (relative to TESTS), from the Exec= lines of their .test files."""
    progs = set()
    for f in sorted(INSTALLED.rglob("*.test")):
        for line in f.read_text().splitlines():
            if line.startswith("Exec="):
                for word in line.split():
                    if word.startswith(str(TESTS) + "/"):
                        progs.add(word[len(str(TESTS)) + 1 :])
    return sorted(progs)


def unclassified(installed: list[str]) -> list[str]:
    """Installed tests this runner neither runs nor names as testing libdbus alone."""
    return [p for p in installed if p not in BUS_PROGRAMS + SESSION_PROGRAMS + LIBDBUS_ONLY]


TAP = re.compile(r"^(not ok|ok)\s+(\d+)\s*(?:-\s*)?([^#]*?)\s*(#\s*(SKIP|TODO)\b(.*))?$", re.I)


def list_cases(prog: Path, env: dict) -> list[str]:
    """The GLib test paths of a program ([] for a TAP script, which runs whole)."""
    if prog.suffix == ".sh":
        return []
    out = subprocess.run([str(prog), "-l"], check=False, env=env, capture_output=True, text=True, timeout=60).stdout
    return [line.strip() for line in out.splitlines() if line.startswith("/")]


def parse_tap(text: str) -> list[tuple[str, str, str]]:
    """(case, status, reason) for every TAP result line; status is pass, fail or skip."""
    out = []
    for line in text.splitlines():
        m = TAP.match(line.strip())
        if not m:
            continue
        ok, number, name, _, directive, reason = m.groups()
        if directive and directive.upper() == "SKIP":
            status = "skip"
        elif ok == "ok" or (directive and directive.upper() == "TODO"):
            status = "pass"
        else:
            status = "fail"
        out.append((name.strip() or f"#{number}", status, (reason or "").strip()))  # a nameless result: its number
    return out


def run_one(prog: Path, case: str | None, env: dict, timeout: float, user: str | None) -> list[tuple[str, str, str]]:
    argv = [str(prog)] + (["-p", case] if case else []) + ["--tap"]
    if user is not None:
        argv = ["runuser", "-u", user, "--"] + ["env"] + [f"{k}={v}" for k, v in env.items()] + argv
    # Output to a file, not a pipe: a daemon left behind by a failed case keeps a pipe open. The case
    # runs in a session of its own so that such a daemon goes with it.
    with tempfile.TemporaryFile("w+") as out:
        p = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.DEVNULL, text=True,
                             start_new_session=True)  # fmt: skip
        try:
            rc, why = p.wait(timeout=timeout), ""
        except subprocess.TimeoutExpired:
            rc, why = None, f"timed out after {timeout:.0f} s"
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            p.wait()
        out.seek(0)
        text = out.read()
    results = parse_tap(text)
    if case is not None:
        results = [r for r in results if r[0] == case]
        if not results:
            tail = (why or f"exit {rc}, no TAP result") + _bail(text)
            results = [(case, "fail", tail)]
        elif rc not in (0, None) and results[0][1] == "pass":
            results = [(case, "fail", f"exit {rc} after ok")]
    else:
        results = whole_program_results(prog.name, text, rc, why)
    return results


def run_session(prog: Path, daemon: str, env: dict, timeout: float, user: str | None) -> list[tuple[str, str, str]]:
    """Run ``prog`` (SESSION_PROGRAMS) against a session bus this starts for it at $XDG_RUNTIME_DIR/bus, in a
    runtime directory of its own, as the tests' user; the bus is stopped afterwards."""
    runtime = Path(tempfile.mkdtemp(prefix="sealbus-conf-session-"))
    try:
        if user is not None:
            pw = pwd.getpwnam(user)
            os.chown(runtime, pw.pw_uid, pw.pw_gid)
        address = f"unix:path={runtime}/bus"
        senv = {**env, "XDG_RUNTIME_DIR": str(runtime), "DBUS_SESSION_BUS_ADDRESS": address}
        argv = [daemon, "--session", "--nofork", f"--address={address}", "--print-address=1"]
        if user is not None:
            argv = ["runuser", "-u", user, "--", "env", *(f"{k}={v}" for k, v in senv.items()), *argv]
        with tempfile.TemporaryFile() as out:
            bus = subprocess.Popen(argv, env=senv, stdout=out, stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                deadline = time.monotonic() + timeout
                while not os.pread(out.fileno(), 1, 0) and bus.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                if not os.pread(out.fileno(), 1, 0):
                    return [(f"{prog.name}: (session bus)", "fail", "the session bus did not start")]
                return run_one(prog, None, senv, timeout, user)
            finally:
                try:
                    os.killpg(bus.pid, signal.SIGTERM)
                    bus.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(bus.pid, signal.SIGKILL)
                    bus.wait()
                except OSError:
                    bus.wait()
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


SKIP_ALL = re.compile(r"^1\.\.0\s*#\s*SKIP\b\s*(?:-\s*)?(.*)$", re.I)


def whole_program_results(name: str, text: str, rc: int | None, why: str) -> list[tuple[str, str, str]]:
    """The rows of a program run whole: one per TAP result, one for a bad exit status, and one skip row
    for a program that skips as a whole (``1..0 # SKIP reason``)."""
    results = [(f"{name}: {n}", s, r) for n, s, r in parse_tap(text)]
    if rc != 0:
        results.append((f"{name}: (exit status)", "fail", why or f"exit {rc}" + _bail(text)))
    elif not results:
        for line in text.splitlines():
            m = SKIP_ALL.match(line.strip())
            if m:
                results.append((name, "skip", m.group(1).strip()))
    return results


def _bail(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("Bail out!"):
            return ": " + line[len("Bail out!") :].strip()[:200]
    return ""


def make_env(daemon: str, home: Path) -> dict:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(home / "runtime"),
        "DBUS_TEST_EXEC": str(TESTS),
        "DBUS_TEST_DATA": str(TESTS / "data"),
        "DBUS_TEST_HOMEDIR": str(home),
        "DBUS_TEST_DATADIR": "/usr/share",
        "DBUS_TEST_DAEMON": daemon,
    }
    return env


def run_daemon(label: str, daemon: str, jobs: int, timeout: float, user: str | None, only: str | None) -> dict:
    home = Path(tempfile.mkdtemp(prefix=f"sealbus-conf-{label}-"))
    (home / "runtime").mkdir(mode=0o700)
    if user is not None:
        pw = pwd.getpwnam(user)
        for p in (home, home / "runtime"):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    env = make_env(daemon, home)
    work = []
    for name in BUS_PROGRAMS:
        prog = TESTS / name
        if not prog.exists():
            continue
        cases = list_cases(prog, env) or [None]
        work += [(prog, c) for c in cases if only is None or re.search(only, c or prog.name)]
    for name in SESSION_PROGRAMS:
        prog = TESTS / name
        if prog.exists() and (only is None or re.search(only, prog.name)):
            work.append((prog, SESSION))
    results: dict[str, tuple[str, str]] = {}
    t0 = time.monotonic()
    try:
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            futs = [pool.submit(run_session, prog, daemon, env, timeout, user) if c is SESSION
                    else pool.submit(run_one, prog, c, env, timeout, user) for prog, c in work]  # fmt: skip
            for f in futs:
                for case, status, reason in f.result():
                    results[case] = (status, reason)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print(f"conformance: {label}: {len(results)} cases in {time.monotonic() - t0:.0f} s: "
          + ", ".join(f"{s} {sum(1 for v in results.values() if v[0] == s)}" for s in ("pass", "fail", "skip")),
          file=sys.stderr)  # fmt: skip
    return results


def _exactly(cases: list[str]) -> str:
    """A --only regex matching exactly these cases (and the whole-program cases' program names)."""
    names = [c.split(": ", 1)[0] if ": " in c else c for c in cases]
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def can_run(user: str, program: str) -> bool:
    """Whether ``user`` can execute ``program`` (its interpreter and the code behind it included)."""
    argv = ["runuser", "-u", user, "--", program, "--help"]
    return subprocess.run(argv, check=False, capture_output=True, timeout=60).returncode == 0


def load_known(path: Path) -> dict[str, str]:
    known = {}
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            case, _, cause = line.partition("  # ")
            known[case.strip()] = cause.strip()  # "<user> <case>"
    return known


def verdict(ref: dict, sb: dict, known: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
    """(gaps: cases dbus-daemon passes and sealbus does not, unexpected: gaps not listed, fixed: listed but passing)."""
    gaps = [c for c, (s, _) in sorted(ref.items()) if s == "pass" and sb.get(c, ("missing", ""))[0] != "pass"]
    # a case sealbus skips where dbus-daemon skips too is fine; one only sealbus fails is a gap as well
    unexpected = [c for c in gaps if c not in known]
    fixed = [c for c in known if c in ref and c not in gaps]
    return gaps, unexpected, fixed


def table(ref: dict, sb: dict, known: dict[str, str], title: str) -> str:
    def count(d, s):
        return sum(1 for v in d.values() if v[0] == s)

    lines = [f"## {title}", "",
             f"dbus-daemon: {count(ref, 'pass')} passed / {count(ref, 'fail')} failed / {count(ref, 'skip')} skipped; "
             f"sealbus: {count(sb, 'pass')} passed / {count(sb, 'fail')} failed / {count(sb, 'skip')} skipped.", "",
             "| case | dbus-daemon | sealbus | cause (sealbus) |", "|---|---|---|---|"]  # fmt: skip
    for case in sorted(set(ref) | set(sb)):
        r = ref.get(case, ("-", ""))
        s = sb.get(case, ("-", ""))
        cause = known.get(case, "") if s[0] != "pass" else ""
        if s[0] == "skip" and not cause:
            cause = s[1]
        elif s[0] == "fail" and not cause:
            cause = s[1]
        lines.append(f"| `{case}` | {r[0]} | {s[0]} | {cause.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sealbus", default=str(ROOT / ".venv" / "bin" / "sealbus-dbus-daemon"))
    ap.add_argument("--reference", default="/usr/bin/dbus-daemon")
    ap.add_argument("--user", action="append", default=None,
                    help="run as this user (repeatable; root: the invoking user); default: root, nobody")  # fmt: skip
    ap.add_argument("--jobs", type=int, default=3)
    ap.add_argument("--no-retry", action="store_true", help="do not re-run unexpected failures one at a time")
    ap.add_argument("--timeout", type=float, default=25.0, help="seconds per case")
    ap.add_argument("--only", help="regex: run only matching cases")
    ap.add_argument("--known", type=Path, default=KNOWN)
    ap.add_argument("--md", type=Path, help="write the per-case table here")
    ap.add_argument("--write-known", action="store_true", help="(re)write the known list from this run's gaps")
    a = ap.parse_args(argv)
    if not TESTS.is_dir():
        print(f"conformance: {TESTS} missing: install Debian's dbus-tests (make setup does)", file=sys.stderr)
        return 2
    missing = unclassified(installed_tests()) if INSTALLED.is_dir() else []
    if missing:
        print(f"conformance: installed tests neither run nor listed as libdbus-only: {', '.join(missing)}: add each "
              "to BUS_PROGRAMS, SESSION_PROGRAMS or LIBDBUS_ONLY (scripts/conformance.py)",
              file=sys.stderr)  # fmt: skip
        return 1
    users = a.user or (["root", "nobody"] if os.geteuid() == 0 else ["self"])
    known_all = load_known(a.known)
    ok = True
    sections = []
    new_known: dict[str, str] = {}
    for user in users:
        as_user = None if user in ("root", "self") else user
        if as_user is not None and not can_run(as_user, a.sealbus):
            print(f"conformance: SKIPPED the run as {user}: it cannot execute {a.sealbus} "
                  "(the checkout is not readable by that user)", file=sys.stderr)  # fmt: skip
            sections.append(f"## As user {user}\n\nNot run: {user} cannot execute {a.sealbus} here.\n")
            continue
        prefix = f"{user} "
        ref = run_daemon(f"dbus-daemon-{user}", a.reference, a.jobs, a.timeout, as_user, a.only)
        sb = run_daemon(f"sealbus-{user}", a.sealbus, a.jobs, a.timeout, as_user, a.only)
        known = {k[len(prefix) :]: v for k, v in known_all.items() if k.startswith(prefix)}
        gaps, unexpected, fixed = verdict(ref, sb, known)
        if unexpected and not a.no_retry:  # once more, one at a time: a loaded machine must not fake a regression
            again = run_daemon(f"sealbus-{user}-retry", a.sealbus, 1, a.timeout, as_user, _exactly(unexpected))
            sb.update({c: r for c, r in again.items() if c in unexpected})
            gaps, unexpected, fixed = verdict(ref, sb, known)
        if a.only:
            fixed = [c for c in fixed if re.search(a.only, c)]
        who = "root" if as_user is None else f"user {user}"
        sections.append(table(ref, sb, known, f"As {who}"))
        for c in unexpected:
            got = sb.get(c, ("missing", ""))
            print(f"conformance: FAIL {prefix}{c}: dbus-daemon passes it, sealbus: {got}", file=sys.stderr)
        for c in fixed:
            print(f"conformance: FIXED {prefix}{c}: passes now, remove it from {a.known.name}", file=sys.stderr)
        print(f"conformance: as {who}: {len(gaps)} gap(s) to dbus-daemon, {len(unexpected)} not listed, "
              f"{len(fixed)} listed but fixed", file=sys.stderr)  # fmt: skip
        ok = ok and not unexpected and not fixed
        new_known.update({f"{prefix}{c}": known.get(c) or sb.get(c, ("", ""))[1] or "?" for c in gaps})
    if a.write_known:
        head = [line for line in a.known.read_text().splitlines() if line.startswith("#")] if a.known.exists() else []
        a.known.write_text("\n".join(head + [f"{k}  # {v}" for k, v in sorted(new_known.items())]) + "\n")
        ok = True
    if a.md:
        a.md.write_text(
            "# Conformance: dbus-daemon's own tests against sealbus\n\n"
            "Debian's `dbus-tests` programs that start a bus, run case by case with `$DBUS_TEST_DAEMON` pointing at\n"
            "dbus-daemon and then at `sealbus-dbus-daemon` (`make conformance`, `scripts/conformance.py`).\n"
            "Causes of the remaining gaps are kept in `scripts/conformance-known.txt`. Only the programs that start a\n"
            "bus are run, and `integration/transient-services.sh` against a session bus the runner starts for it; the\n"
            "others (`LIBDBUS_ONLY` in the script) test libdbus alone and give the same result whatever the daemon,\n"
            "so the totals are smaller than a run of every program. The run fails on an installed test that is in\n"
            "neither list. A program that skips as a whole (`1..0 # SKIP`) is one row.\n\n" + "\n".join(sections)
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
