"""The enforcing SELinux tier: run as root inside a guest booted enforcing, with
the sealbus module loaded (vagrant/provision.sh or vagrant/qemu/guest-run.sh).

Each case is PASS, FAIL or XFAIL (known-missing with the reason; never a
silent pass). Prints a table, writes JSON to --out, exits 1 on any FAIL.

    python -m tests.vm.enforcing_tier --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYTHON = os.environ.get("SEALBUS_VM_PYTHON", "/opt/sealbus/venv/bin/python")
HELPER = Path("/usr/libexec/sealbus/sealbus-test-launch-helper")
LAUNCHER = Path("/usr/libexec/sealbus/sealbus-launcher")
PROBE_DIR = Path("/run/sealbus-probe")
BUS_DIR = Path("/run/sealbus")
ISSUE_BROKER_MEDIATION = 8


@dataclass
class Case:
    name: str
    status: str
    detail: str


RESULTS: list[Case] = []


def record(name: str, ok: bool, detail: str) -> None:
    RESULTS.append(Case(name, "PASS" if ok else "FAIL", detail))


def xfail(name: str, reason: str) -> None:
    RESULTS.append(Case(name, "XFAIL", reason))


def sh(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)


def probe(domain: str, action: str, arg: str) -> tuple[int, str]:
    # -I: no user site (no search of $HOME); stdin from us, not init's /dev/null fd.
    proc = sh("runcon", "-t", domain, "--", PYTHON, "-I", str(HERE / "probe.py"), action, arg)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def context_of(pid: int) -> str:
    return Path(f"/proc/{pid}/attr/current").read_text().strip("\0\n")


def avc_denied(scontext_type: str, since: float) -> list[str]:
    """AVC denials for a source type in the audit log, logged after `since` (epoch)."""
    lines = []
    for line in Path("/var/log/audit/audit.log").read_text(errors="replace").splitlines():
        if "avc:  denied" not in line or f":{scontext_type}:" not in line:
            continue
        try:
            stamp = float(line.split("msg=audit(")[1].split(":")[0])
        except (IndexError, ValueError):
            stamp = since
        if stamp >= since - 1:
            lines.append(line)
    return lines


def wait_for(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def case_platform() -> None:
    enforce = sh("getenforce").stdout.strip()
    record("getenforce is Enforcing", enforce == "Enforcing", enforce)
    modules = sh("semodule", "-l").stdout.split()
    record("sealbus module loaded", "sealbus" in modules, "semodule -l")
    labels = sh("ls", "-Z", str(LAUNCHER), str(HELPER)).stdout.strip().replace("\n", "; ")
    record("entry points labelled", "sealbus_launch_exec_t" in labels, labels)


def case_socket(start: float) -> None:
    """Socket rules with a stand-in listener in sealbus_launch_t in a sealbus_var_run_t dir."""
    sock = PROBE_DIR / "bus"
    listener = subprocess.Popen([str(HELPER), "listen", str(sock)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        up = wait_for(sock.exists, 30)
        if not up:
            record("listener in sealbus_launch_t", False, "no socket after 30 s (see audit log)")
            return
        ctx = context_of(listener.pid)
        record("listener in sealbus_launch_t", ":sealbus_launch_t:" in ctx, ctx)
        label = sh("ls", "-Z", str(sock)).stdout.strip()
        record("bus socket labelled sealbus_var_run_t", "sealbus_var_run_t" in label, label)
        rc, out = probe("sealbus_demo_client_t", "connect", str(sock))
        record("demo_client connects to the bus socket", rc == 0, out)
        rc, out = probe("sealbus_demo_denied_t", "connect", str(sock))
        record("demo_denied: EACCES on connect", rc == 1 and "EACCES" in out, out)
        time.sleep(1.5)
        avcs = [a for a in avc_denied("sealbus_demo_denied_t", start) if "sealbus_var_run_t" in a]
        record("demo_denied connect: AVC in audit log", bool(avcs), avcs[0][-220:] if avcs else "no AVC")
    finally:
        listener.kill()
        listener.wait()


def case_payload_fs(start: float) -> None:
    """The payload fs label, applied by the context= mount option from sealbus_launch_t."""
    # Outside the sealbus_var_run_t dir, so a denial is about the payload fs itself.
    mnt = Path("/mnt/sealbus-payload")
    mnt.mkdir(exist_ok=True)
    proc = sh(str(HELPER), "mount", str(mnt))
    record("launcher domain mounts with context=sealbus_fs_t", proc.returncode == 0, proc.stderr.strip() or "mounted")
    if proc.returncode != 0:
        return
    try:
        label = sh(str(HELPER), "label", str(mnt)).stdout.strip()
        record("payload fs root carries sealbus_fs_t", "sealbus_fs_t" in label, label)
        rc, out = probe("sealbus_demo_client_t", "write-payload", str(mnt))
        record("demo_client creates/writes a payload on sealbus_fs_t", rc == 0, out)
        rc, out = probe("sealbus_demo_denied_t", "write-payload", str(mnt))
        record("demo_denied: EACCES creating on the payload fs", rc == 1 and "EACCES" in out, out)
        rc, out = probe("sealbus_demo_denied_t", "list", str(mnt))
        record("demo_denied: EACCES opening the payload fs", rc == 1 and "EACCES" in out, out)
        time.sleep(1.5)
        avcs = [a for a in avc_denied("sealbus_demo_denied_t", start) if "sealbus_fs_t" in a]
        record("demo_denied payload fs: AVC in audit log", bool(avcs), avcs[0][-220:] if avcs else "no AVC")
        rc, out = probe("sealbus_demo_service_t", "write-payload", str(mnt))
        record("demo_service (read-only interface) cannot create", rc == 1 and "EACCES" in out, out)
        rc, out = probe("sealbus_demo_denied_t", "read", str(mnt / "anything"))
        record("demo_denied: EACCES opening a file on the payload fs", rc == 1 and "EACCES" in out, out)
    finally:
        proc = sh(str(HELPER), "umount", str(mnt))
        record("launcher domain unmounts the payload fs", proc.returncode == 0, proc.stderr.strip() or "unmounted")


def start_real_bus(runtime: Path) -> tuple[subprocess.Popen | None, str]:
    """The real launcher through its entry point; (process, address or failure reason)."""
    proc = subprocess.Popen([str(LAUNCHER), "--runtime-dir", str(runtime)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if sel.select(timeout=90) and proc.poll() is None:
        line = proc.stdout.readline().strip()
        if line.startswith("unix:"):
            return proc, line
    proc.kill()
    _, err = proc.communicate(timeout=10)
    last = err.strip().splitlines()[-1] if err.strip() else "no stderr"
    return None, f"sealbus run --system (via {LAUNCHER}) did not start: rc={proc.returncode}: {last}"


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def case_real_bus(start: float) -> None:
    names = ["launcher runs in sealbus_launch_t", "broker runs in sealbus_t",
             "demo_client connects to the real bus", "demo_denied: EACCES on the real bus socket",
             "demo_client seals a payload on the real payload fs", "demo_denied: EACCES on the real payload fs"]
    proc, why = start_real_bus(BUS_DIR)
    if proc is None:
        for name in names:
            xfail(name, why)
        return
    try:
        record(names[0], ":sealbus_launch_t:" in context_of(proc.pid), context_of(proc.pid))
        kids = children(proc.pid)
        ctxs = [context_of(k) for k in kids]
        record(names[1], any(":sealbus_t:" in c for c in ctxs), "; ".join(ctxs) or "no child process")
        path = why.split("path=", 1)[1].split(",")[0]
        rc, out = probe("sealbus_demo_client_t", "connect", path)
        record(names[2], rc == 0, out)
        rc, out = probe("sealbus_demo_denied_t", "connect", path)
        record(names[3], rc == 1 and "EACCES" in out, out)
        fs = BUS_DIR / "fs"
        if (fs / "tmp").exists():
            rc, out = probe("sealbus_demo_client_t", "seal-payload", str(fs))
            record(names[4], rc == 0, out)
            rc, out = probe("sealbus_demo_denied_t", "list", str(fs))
            record(names[5], rc == 1 and "EACCES" in out, out)
        else:
            xfail(names[4], f"the system bus serves no payload fs at {fs}")
            xfail(names[5], f"the system bus serves no payload fs at {fs}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def case_dbus_class() -> None:
    why = f"needs the broker's SELinux send_msg/acquire_svc mediation (issue {ISSUE_BROKER_MEDIATION})"
    xfail("dbus send_msg: forbidden send denied + USER_AVC names both contexts", why)
    xfail("dbus acquire_svc: forbidden name denied + USER_AVC names both contexts", why)


def table(results: list[Case]) -> str:
    w = max(len(c.name) for c in results)
    lines = [f"{'case':<{w}}  status  detail", f"{'-' * w}  ------  ------"]
    lines += [f"{c.name:<{w}}  {c.status:<6}  {' '.join(c.detail.split())[-160:]}" for c in results]
    counts = {s: sum(c.status == s for c in results) for s in ("PASS", "FAIL", "XFAIL")}
    lines.append(f"== {counts['PASS']} passed, {counts['FAIL']} failed, {counts['XFAIL']} xfail")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="sealbus enforcing SELinux tier (run as root in the guest)")
    parser.add_argument("--out", type=Path, help="write results as JSON here")
    args = parser.parse_args(argv)
    PROBE_DIR.mkdir(exist_ok=True)
    sh("chcon", "-t", "sealbus_var_run_t", str(PROBE_DIR))
    start = time.time()
    for step in (case_platform, lambda: case_socket(start), lambda: case_payload_fs(start),
                 lambda: case_real_bus(start), case_dbus_class):
        try:
            step()
        except Exception as e:  # a broken step is a failure, never a skip
            record(f"step {getattr(step, '__name__', 'case')} crashed", False, repr(e))
    print(table(RESULTS))
    if args.out:
        args.out.write_text(json.dumps([asdict(c) for c in RESULTS], indent=2))
    return 1 if any(c.status == "FAIL" for c in RESULTS) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
