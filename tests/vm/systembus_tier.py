"""The system-bus VM tier: run as root inside the guest's second boot (kernel option
sealbus.systembus=1), where sealbus, not dbus-daemon, is the machine's system bus from
early boot: vagrant/qemu/guest-systembus.sh installed it and enabled sealbus-dbus.service
(Alias=dbus.service, Sockets=dbus.socket) as docs/system-bus.md tells a Debian
administrator to, with Debian's /usr/share/dbus-1 files unchanged and SELinux enforcing.

Each case is PASS, FAIL or XFAIL, as in tests/vm/enforcing_tier.py (whose helpers and
table this reuses). Prints the table, writes JSON to --out, exits 1 on any FAIL.

    python -m tests.vm.systembus_tier --out results.json
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.procfs import children
from tests.vm.enforcing_tier import PYTHON, context_of, record, run_steps, sh, type_of, wait_for

HERE = Path(__file__).resolve().parent
BUS_SOCKET = "/run/dbus/system_bus_socket"
BUS_ENV = {"DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={BUS_SOCKET}", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
# the test-only activatable service: a plain Exec=/User= service file (no SystemdService=)
SERVICE = "org.sealbus.VmTest.Confined"
SERVICE_USER = "sealbus-vmtest"
LIBEXEC = Path("/usr/local/libexec/sealbus-vmtest")
SERVICE_FILE = Path(f"/usr/share/dbus-1/system-services/{SERVICE}.service")
SERVICE_POLICY = Path("/etc/dbus-1/system.d/org.sealbus.VmTest.conf")
MODULE = "sealbus_vmtest"
# the domains whose denials would mean a real client could not use the bus (the stranger's
# deliberate USER_AVC aside)
WATCHED_TYPES = ("sealbus_t", "sealbus_launch_t", "init_t", "initrc_t", "systemd_logind_t",
                 "systemd_hostnamed_t", "systemd_timedated_t", "sealbus_vmtest_svc_t")  # fmt: skip


LOGIN_CONTEXT = "unconfined_u:unconfined_r:unconfined_t:s0"


def login(*cmd: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """``cmd`` as root in an unconfined login's context, the way an administrator runs it (the tier itself runs
    in initrc_t, to which the distribution policy lets no system service reply): a transient unit that systemd
    (asked over the bus) starts in unconfined_t, its output piped back."""
    return sh("systemd-run", "--quiet", "--wait", "--pipe", "--collect", "-p", f"SELinuxContext={LOGIN_CONTEXT}",
              "-E", "SYSTEMD_PAGER=cat", "--", *cmd, timeout=timeout)  # fmt: skip


def busctl(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return sh("busctl", "--system", "--no-pager", *args, timeout=timeout)


def driver(method: str, signature: str = "", *args: str) -> tuple[int, str]:
    sig = [signature, *args] if signature else []
    p = busctl("call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", method, *sig)
    return p.returncode, (p.stdout + p.stderr).strip()


def has_owner(name: str) -> bool:
    return driver("NameHasOwner", "s", name)[1] == "b true"


def unit_active(unit: str) -> str:
    return sh("systemctl", "is-active", unit).stdout.strip()


def bus_pids() -> tuple[int, list[int]]:
    main = int(sh("systemctl", "show", "-p", "MainPID", "--value", "dbus.service").stdout.strip() or 0)
    return main, (children(main) if main else [])


def case_bus_is_sealbus() -> None:
    enforce = sh("getenforce").stdout.strip()
    record("getenforce is Enforcing", enforce == "Enforcing", enforce)
    show = sh("systemctl", "show", "-p", "Id,Names,ActiveState,FragmentPath", "dbus.service").stdout
    record("dbus.service is sealbus-dbus.service (alias), active",
           "Id=sealbus-dbus.service" in show and "ActiveState=active" in show, show)  # fmt: skip
    main, kids = bus_pids()
    launcher = context_of(main) if main else "no MainPID"
    brokers = [f"{k} {context_of(k)}" for k in kids]
    record("bus: launcher in sealbus_launch_t, broker in sealbus_t",
           ":sealbus_launch_t:" in launcher and any(":sealbus_t:" in b for b in brokers),
           f"launcher {main} {launcher}; children {'; '.join(brokers) or 'none'}")  # fmt: skip
    dd = sh("pgrep", "-a", "dbus-daemon").stdout.strip()
    record("dbus-daemon is not running", dd == "", dd or "no dbus-daemon process")
    listening = listening_inodes(BUS_SOCKET)
    holders = [k for k in kids if listening & socket_inodes(k)]
    record(f"the broker holds the listening socket {BUS_SOCKET} (from dbus.socket)",
           bool(holders), f"listening inodes {sorted(listening)}; held by {holders or 'no child of the launcher'}")  # fmt: skip


def listening_inodes(path: str) -> set[str]:
    """Inodes of the listening unix sockets bound to ``path`` (/proc/net/unix: Flags 00010000 = listening)."""
    out = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        f = line.split()
        if len(f) >= 8 and f[-1] == path and f[3] == "00010000":
            out.add(f[6])
    return out


def socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = fd.readlink().as_posix()
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(link[8:-1])
    return out


def case_systemd_clients() -> None:
    rc, out = driver("GetConnectionUnixProcessID", "s", "org.freedesktop.systemd1")
    record("systemd (PID 1) holds a connection: org.freedesktop.systemd1 is pid 1", rc == 0 and out == "u 1", out)
    p = busctl("list")
    names = {line.split()[0] for line in p.stdout.splitlines() if line.strip()}
    want = {"org.freedesktop.systemd1", "org.freedesktop.login1"}
    record("busctl --system list shows org.freedesktop.systemd1 and login1",
           p.returncode == 0 and want <= names, f"rc={p.returncode} missing {sorted(want - names)}; {p.stderr[-200:]}")  # fmt: skip
    who = login("id", "-Z")
    record("an unconfined login (unconfined_t, started by systemd over the bus)",
           who.returncode == 0 and who.stdout.strip() == LOGIN_CONTEXT, f"{who.stdout.strip()} {who.stderr.strip()}")  # fmt: skip
    p = login("loginctl", "list-seats")
    q = login("loginctl", "show-seat", "seat0", "-p", "Id")
    record("loginctl works (systemd-logind on the bus)",
           p.returncode == 0 and q.returncode == 0 and "Id=seat0" in q.stdout,
           f"{p.stdout.strip()} | {q.stdout.strip()} {p.stderr.strip()} {q.stderr.strip()}")  # fmt: skip


def case_systemd_activation(tool: str, name: str, unit: str, expect: str) -> None:
    """``tool`` needs ``name``, which nobody owns yet: the bus asks systemd (ActivationRequest) for the
    SystemdService= of /usr/share/dbus-1/system-services/``name``.service, which starts ``unit``."""
    before_unit, before_owned = unit_active(unit), has_owner(name)
    p = login(tool, "status")
    after_unit = unit_active(unit)
    owner = driver("GetConnectionUnixProcessID", "s", name)[1]
    unit_pid = sh("systemctl", "show", "-p", "MainPID", "--value", unit).stdout.strip()
    journal = sh("journalctl", "-b", "--no-pager", "-o", "cat", "-u", "sealbus-dbus.service").stdout
    asked = f"activating via systemd: service name='{name}'" in journal
    record(f"{tool} works, {unit} bus-activated through SystemdService=",
           before_unit != "active" and not before_owned and p.returncode == 0 and expect in p.stdout
           and after_unit == "active" and owner == f"u {unit_pid}" and asked,
           f"before: {before_unit}, owned={before_owned}; {tool} rc={p.returncode} {p.stderr.strip()[-160:]}; "
           f"after: {after_unit}, owner {owner}, unit MainPID {unit_pid}; broker asked systemd: {asked}")  # fmt: skip


def install_test_service() -> str:
    """The test-only service: its user, its two programs, its policy module, its service file and
    system.d policy (root may call it, only its user may own it), then ReloadConfig."""
    notes = []
    if sh("id", SERVICE_USER).returncode != 0:
        sh("useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
           SERVICE_USER)  # fmt: skip
    LIBEXEC.mkdir(parents=True, exist_ok=True)
    source = (HERE / "activated_service.py").read_text()
    for prog in ("service", "stranger"):
        path = LIBEXEC / prog
        path.write_text(f"#!{PYTHON} -I\n" + source)
        path.chmod(0o755)
    build = Path("/tmp/sealbus-vmtest-policy")
    sh("rm", "-rf", str(build))
    build.mkdir()
    # the devel Makefile reads a local module's interfaces only with its .te beside them
    for f in [*HERE.glob(f"{MODULE}.*"), *(HERE.parents[1] / "policy").glob("sealbus.*")]:
        (build / f.name).write_text(f.read_text())
    p = subprocess.run(["make", "-f", "/usr/share/selinux/devel/Makefile", f"{MODULE}.pp"], cwd=build,
                       capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    notes.append(f"module build rc={p.returncode} {p.stderr.strip()[-200:]}")
    p = sh("semodule", "-i", str(build / f"{MODULE}.pp"), timeout=600)
    notes.append(f"semodule rc={p.returncode} {p.stderr.strip()[-200:]}")
    sh("restorecon", "-R", str(LIBEXEC))
    notes.append(sh("ls", "-Z", str(LIBEXEC)).stdout.strip().replace("\n", "; "))
    SERVICE_FILE.write_text(f"[D-BUS Service]\nName={SERVICE}\nExec={LIBEXEC / 'service'} serve {SERVICE}\n"
                            f"User={SERVICE_USER}\n")  # fmt: skip
    SERVICE_POLICY.write_text(f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy user="{SERVICE_USER}"><allow own="{SERVICE}"/></policy>
  <policy user="root"><allow send_destination="{SERVICE}" send_interface="org.sealbus.VmTest"/></policy>
</busconfig>
""")
    sh("restorecon", str(SERVICE_FILE), str(SERVICE_POLICY))
    rc, out = driver("ReloadConfig")
    notes.append(f"ReloadConfig: rc={rc} {out}")
    return "; ".join(notes)


def service_started() -> str:
    """Why the test service counts as started ('' when it does not: no owner, no process)."""
    procs = sh("pgrep", "-af", f"{LIBEXEC / 'service'}").stdout.strip()
    return ("owned; " if has_owner(SERVICE) else "") + procs


def case_exec_user_activation(start: float) -> None:
    notes = install_test_service()
    rc, out = driver("ListActivatableNames")
    record("test service file installed and activatable (ListActivatableNames after ReloadConfig)",
           rc == 0 and f'"{SERVICE}"' in out and not service_started(), f"{notes} | {out[-200:]}")  # fmt: skip

    # a sender the XML policy denies (not root): refused before anything is started
    p = sh("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", "busctl", "--system",
           "call", SERVICE, "/", "org.sealbus.VmTest", "Who", timeout=90)  # fmt: skip
    time.sleep(2)
    started = service_started()
    record("XML-denied sender (nobody) cannot trigger activation",
           p.returncode != 0 and bool(re.search(r"(?i)access ?denied|permission denied", p.stdout + p.stderr))
           and not started,
           f"rc={p.returncode} {(p.stdout + p.stderr).strip()[-200:]}; started: {started or 'no'}")  # fmt: skip

    # a sender SELinux denies (may connect, may not send): refused, USER_AVC from the bus
    p = subprocess.run([str(LIBEXEC / "stranger"), "call", SERVICE], capture_output=True, text=True, timeout=120,
                       env=BUS_ENV, check=False)  # fmt: skip
    time.sleep(2)
    started = service_started()
    avcs = [a for a in stranger_user_avcs(start)]
    record("SELinux-denied sender (sealbus_vmtest_stranger_t) cannot trigger activation; USER_AVC logged",
           p.returncode == 2 and "AccessDenied" in p.stdout and not started and bool(avcs),
           f"rc={p.returncode} {(p.stdout + p.stderr).strip()[-200:]}; started: {started or 'no'}; "
           f"{avcs[0][-200:] if avcs else 'no USER_AVC from sealbus_vmtest_stranger_t'}")  # fmt: skip

    # root (an unconfined login) may: the launcher starts Exec= as User=, in the domain sealbus_system_domain() gives it
    uid = sh("id", "-u", SERVICE_USER).stdout.strip()
    p = login("busctl", "--system", "--timeout=120", "call", SERVICE, "/", "org.sealbus.VmTest", "Who")
    owner_uid = driver("GetConnectionUnixUser", "s", SERVICE)[1]
    owner_pid = driver("GetConnectionUnixProcessID", "s", SERVICE)[1].removeprefix("u ")
    main, _ = bus_pids()
    parent = sh("ps", "-o", "ppid=", "-p", owner_pid).stdout.strip() if owner_pid.isdigit() else "?"
    record(f"plain Exec=/User= service activated as its user ({SERVICE_USER}) by the launcher",
           p.returncode == 0 and f"uid={uid} " in p.stdout and owner_uid == f"u {uid}" and parent == str(main),
           f"{p.stdout.strip()} {p.stderr.strip()[-160:]}; owner uid {owner_uid}, pid {owner_pid}, parent {parent} "
           f"(launcher {main})")  # fmt: skip
    record("the activated service runs confined (sealbus_vmtest_svc_t, sealbus_system_domain())",
           "context=" in p.stdout and type_of(p.stdout.split("context=")[-1].strip()) == "sealbus_vmtest_svc_t",
           p.stdout.strip())  # fmt: skip
    sh("pkill", "-f", str(LIBEXEC / "service"))


def audit_lines() -> list[str]:
    return Path("/var/log/audit/audit.log").read_text(errors="replace").splitlines()


def stranger_user_avcs(since: float) -> list[str]:
    return [ln for ln in audit_lines() if ln.startswith("type=USER_AVC") and "denied" in ln
            and ":sealbus_vmtest_stranger_t:" in ln and stamp(ln) >= since - 1]  # fmt: skip


def stamp(line: str) -> float:
    m = re.search(r"msg=audit\((\d+\.\d+):", line)
    return float(m.group(1)) if m else 0.0


def case_no_denials() -> None:
    """No AVC (kernel) or USER_AVC (the bus) denial involving the bus, systemd or the clients since boot;
    the stranger's deliberate USER_AVC (above) shows that denials do reach the log."""
    bad = []
    for line in audit_lines():
        if "denied" not in line or not line.startswith(("type=AVC", "type=USER_AVC")):
            continue
        if ":sealbus_vmtest_stranger_t:" in line:
            continue
        if any(f":{t}:" in line for t in WATCHED_TYPES):
            bad.append(line)  # the launcher's inotify watches included: the policy grants them
    name = "no AVC/USER_AVC denial for the bus, systemd, logind, hostnamed, timedated, the service, root"
    record(name, not bad, f"{len(bad)} denials: " + " || ".join(b[-230:] for b in bad[:4]))


BUS_ERROR = re.compile(r"(?i)\b(fail\w*|error\w*|denied|refused|timed? ?out|disconnect\w*)\b")


def case_journal() -> None:
    """Nothing from systemd, logind, hostnamed or timedated about the bus failing this boot."""
    lines = []
    for sel in (["_PID=1", "_TRANSPORT=journal"], ["-u", "systemd-logind.service"], ["-u", "systemd-hostnamed.service"],
                ["-u", "systemd-timedated.service"]):  # fmt: skip
        out = sh("journalctl", "-b", "--no-pager", "-o", "short-monotonic", *sel, timeout=120).stdout
        # run-uN.service: the tier's own commands (login()), whose failures their own cases report
        lines += [ln for ln in out.splitlines()
                  if re.search(r"(?i)bus", ln) and BUS_ERROR.search(ln) and not re.search(r"\brun-u\d+\.service", ln)]  # fmt: skip
    failed = sh("systemctl", "--failed", "--no-legend", "--plain").stdout.strip()
    record("journal: no D-Bus errors from systemd, logind, hostnamed, timedated",
           not lines, f"{len(lines)} lines: " + " || ".join(ln[-200:] for ln in lines[:4]) + f"; failed units: {failed or 'none'}")  # fmt: skip


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="sealbus as the system bus of a booted enforcing guest")
    parser.add_argument("--out", type=Path, help="write results as JSON here")
    args = parser.parse_args(argv)
    start = time.time()
    # systemd and logind connect early; give a slow (emulated) guest's boot time to settle
    wait_for(lambda: has_owner("org.freedesktop.login1"), 120)
    return run_steps(
        (
            case_bus_is_sealbus,
            case_systemd_clients,
            lambda: case_systemd_activation(
                "hostnamectl", "org.freedesktop.hostname1", "systemd-hostnamed.service", "Static hostname: sealbus-vm"
            ),
            lambda: case_systemd_activation(
                "timedatectl", "org.freedesktop.timedate1", "systemd-timedated.service", "Time zone"
            ),
            lambda: case_exec_user_activation(start),
            case_no_denials,
            case_journal,
        ),
        args.out,
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
