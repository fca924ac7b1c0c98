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

from broker.payload.backing import LAUNCHER_STORE_NAME
from tests.procfs import children, proc_status
from tests.vm.probe import DBUS_TIMEOUT, DBusError, _bus, _unwrap, own

HERE = Path(__file__).resolve().parent
PYTHON = os.environ.get("SEALBUS_VM_PYTHON", "/opt/sealbus/venv/bin/python")
HELPER = Path("/usr/libexec/sealbus/sealbus-test-launch-helper")
LAUNCHER = Path("/usr/libexec/sealbus/sealbus-launcher")
PROBE_DIR = Path("/run/sealbus-probe")
BUS_DIR = Path("/run/sealbus")
# The real bus's config: the default system bus config plus what the dbus-class
# cases need (an XML policy that lets the demo names be owned and called, so that
# SELinux alone decides, and two names associated with sealbus_demo_name_t).
TIER_CONFIG = Path("/etc/sealbus/vm-tier.conf")
SYSTEM_CONF = HERE.parents[1] / "broker" / "launch" / "system.conf"
NAME_CONTEXT = "system_u:object_r:sealbus_demo_name_t:s0"
SERVICE_NAME = "org.sealbus.Demo.Service"  # no association: acquire_svc against the bus's label (sealbus_t)
OWNED_NAME = "org.sealbus.Demo.Owned"  # associated with sealbus_demo_name_t, owned by the service
GUARDED_NAME = "org.sealbus.Demo.Guarded"  # associated with sealbus_demo_name_t, nobody may take it but the service
FREE_NAME = "org.sealbus.Demo.Free"  # no association, nobody owns it
RESULTS_DIR = Path("/var/tmp")  # --out's directory: the launcher's log lands next to the results
# Reload on change, without SIGHUP: the launcher's inotify watches under enforcing.
RELOAD_NAME = "org.sealbus.Demo.Reloaded"  # owned before the config changes, denied by the changed config
ACTIVATABLE_NAME = "org.sealbus.Demo.Activatable"  # its service file appears while the bus runs
SERVICE_DIR = Path("/usr/share/dbus-1/system-services")  # a standard system service dir (usr_t)
STORE_TYPE = "sealbus_store_t"


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


def probe_cmd(domain: str, action: str, *args: str) -> list[str]:
    # -I: no user site (no search of $HOME)
    return ["runcon", "-t", domain, "--", PYTHON, "-I", str(HERE / "probe.py"), action, *args]


def probe(domain: str, action: str, *args: str) -> tuple[int, str]:
    proc = sh(*probe_cmd(domain, action, *args), timeout=120)
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


def user_avcs(perm: str, since: float) -> list[dict[str, str]]:
    """USER_AVC dbus records for perm logged after `since`, as {field: value} (plus 'line')."""
    out = []
    for line in Path("/var/log/audit/audit.log").read_text(errors="replace").splitlines():
        if not line.startswith("type=USER_AVC") or f"{{ {perm} }}" not in line or "tclass=dbus" not in line:
            continue
        try:
            stamp = float(line.split("msg=audit(")[1].split(":")[0])
        except (IndexError, ValueError):
            stamp = since
        if stamp < since - 1:
            continue
        fields = {"line": line}
        for word in line.replace("'", " ").split():
            key, eq, value = word.partition("=")
            if eq and key not in fields:
                fields[key] = value.strip('"')
        out.append(fields)
    return out


def type_of(context: str) -> str:
    parts = context.split(":")
    return parts[2] if len(parts) > 2 else context


def wait_for(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def wait_for_avcs(source_type: str, start: float, target: str, timeout: float = 10) -> list:
    """The AVC denials of source_type mentioning target, once the audit log has at least one (or [])."""
    found: list = []

    def seen() -> bool:
        found[:] = [a for a in avc_denied(source_type, start) if target in a]
        return bool(found)

    wait_for(seen, timeout)
    return found


def case_platform() -> None:
    enforce = sh("getenforce").stdout.strip()
    record("getenforce is Enforcing", enforce == "Enforcing", enforce)
    modules = sh("semodule", "-l").stdout.split()
    record("sealbus module loaded", "sealbus" in modules, "semodule -l")
    record("sealbus_test module loaded (the demo domains)", "sealbus_test" in modules, "semodule -l")
    labels = sh("ls", "-Z", str(LAUNCHER), str(HELPER)).stdout.strip().replace("\n", "; ")
    record("entry points labelled", "sealbus_launch_exec_t" in labels, labels)


def case_socket(start: float) -> None:
    """Socket rules with a stand-in listener in sealbus_launch_t in a sealbus_runtime_t dir."""
    sock = PROBE_DIR / "bus"
    listener = subprocess.Popen(
        [str(HELPER), "listen", str(sock)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        up = wait_for(sock.exists, 30)
        if not up:
            record("listener in sealbus_launch_t", False, "no socket after 30 s (see audit log)")
            return
        ctx = context_of(listener.pid)
        record("listener in sealbus_launch_t", ":sealbus_launch_t:" in ctx, ctx)
        label = sh("ls", "-Z", str(sock)).stdout.strip()
        record("bus socket labelled sealbus_runtime_t", "sealbus_runtime_t" in label, label)
        rc, out = probe("sealbus_demo_client_t", "connect", str(sock))
        record("demo_client connects to the bus socket", rc == 0, out)
        rc, out = probe("sealbus_demo_denied_t", "connect", str(sock))
        record("demo_denied: EACCES on connect", rc == 1 and "EACCES" in out, out)
        avcs = wait_for_avcs("sealbus_demo_denied_t", start, "sealbus_runtime_t")
        record("demo_denied connect: AVC in audit log", bool(avcs), avcs[0][-220:] if avcs else "no AVC")
    finally:
        listener.kill()
        listener.wait()


def case_payload_fs(start: float) -> None:
    """The payload fs label, applied by the context= mount option from sealbus_launch_t."""
    # Outside the sealbus_runtime_t dir, so a denial is about the payload fs itself.
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
        avcs = wait_for_avcs("sealbus_demo_denied_t", start, "sealbus_fs_t")
        record("demo_denied payload fs: AVC in audit log", bool(avcs), avcs[0][-220:] if avcs else "no AVC")
        rc, out = probe("sealbus_demo_service_t", "write-payload", str(mnt))
        record("demo_service (read-only interface) cannot create", rc == 1 and "EACCES" in out, out)
        rc, out = probe("sealbus_demo_denied_t", "read", str(mnt / "anything"))
        record("demo_denied: EACCES opening a file on the payload fs", rc == 1 and "EACCES" in out, out)
    finally:
        proc = sh(str(HELPER), "umount", str(mnt))
        record("launcher domain unmounts the payload fs", proc.returncode == 0, proc.stderr.strip() or "unmounted")


def write_tier_config(extra: str = "") -> Path:
    """The tier's bus config (replaced in one rename: a watching launcher never reads half of it), with
    the standard system service directories; SERVICE_DIR exists before the bus starts, so it is watched."""
    TIER_CONFIG.parent.mkdir(exist_ok=True)
    SERVICE_DIR.mkdir(parents=True, exist_ok=True)
    sh("restorecon", "-R", str(SERVICE_DIR.parent))
    new = TIER_CONFIG.with_name(f".{TIER_CONFIG.name}.new")
    new.write_text(f"""<busconfig>
  <include>{SYSTEM_CONF}</include>
  <standard_system_servicedirs/>
  <policy context="default">
    <allow own_prefix="org.sealbus.Demo"/>
    <allow send_destination_prefix="org.sealbus.Demo"/>
  </policy>
  <selinux>
    <associate own="{OWNED_NAME}" context="{NAME_CONTEXT}"/>
    <associate own="{GUARDED_NAME}" context="{NAME_CONTEXT}"/>
  </selinux>
{extra}</busconfig>
""")
    # labelled before it takes the name: made here (initrc_t) it is etc_runtime_t, which the launcher may
    # not read, and a relabel is no change inotify reports (IN_ATTRIB)
    sh("restorecon", "-F", str(new))
    os.replace(new, TIER_CONFIG)
    return TIER_CONFIG


class LauncherLog:
    """The launcher's (and through it the broker's) stderr, drained from a pipe into
    RESULTS_DIR/launcher.log: a pipe, because sealbus_t may write an init script's pipe
    but not its files; drained, so a chatty broker never blocks on a full pipe."""

    def __init__(self, stream):
        import threading

        self.path = RESULTS_DIR / "launcher.log"
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._drain, args=(stream,), daemon=True)
        self.thread.start()

    def _drain(self, stream) -> None:
        with open(self.path, "a") as out:
            for line in stream:
                self.lines.append(line.rstrip("\n"))
                out.write(line)
                out.flush()

    def text(self) -> str:
        return "\n".join(self.lines)

    def failure(self) -> str:
        """The last exception (with the line that raised it) or, failing that, the last lines."""
        lines = [ln for ln in self.lines if ln.strip()]
        for i in range(len(lines) - 1, -1, -1):
            if lines[i].lstrip(" |").startswith("File "):
                return " / ".join(ln.strip(" |") for ln in lines[i : i + 4])
        return " / ".join(lines[-3:]) or "no stderr"


def start_real_bus(runtime: Path, config: Path) -> tuple[subprocess.Popen | None, str, LauncherLog]:
    """The real launcher through its entry point; (process, address or failure reason, its log)."""
    import selectors

    proc = subprocess.Popen([str(LAUNCHER), "--runtime-dir", str(runtime), "--config", str(config)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    log = LauncherLog(proc.stderr)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if sel.select(timeout=120) and proc.poll() is None:
        line = proc.stdout.readline().strip()
        if line.startswith("unix:"):
            return proc, line, log
    proc.kill()
    proc.wait(timeout=10)
    log.thread.join(timeout=5)
    return None, f"{LAUNCHER} did not start: rc={proc.returncode}: {log.failure()}", log


def case_real_bus(start: float) -> None:
    names = [
        "launcher runs in sealbus_launch_t",
        "broker runs in sealbus_t",
        "demo_client connects to the real bus",
        "demo_denied: EACCES on the real bus socket",
        "demo_client seals a payload on the real payload fs",
        "demo_denied: EACCES on the real payload fs",
    ]
    proc, why, log = start_real_bus(BUS_DIR, write_tier_config())
    if proc is None:
        for name in names + list(RELOAD_CASES.values()):
            record(name, False, why)
        case_dbus_class(None, start, log)
        return
    try:
        record(names[0], ":sealbus_launch_t:" in context_of(proc.pid), context_of(proc.pid))
        kids = children(proc.pid)
        ctxs = [context_of(k) for k in kids]
        record(names[1], any(":sealbus_t:" in c for c in ctxs), "; ".join(ctxs) or "no child process")
        brokers = [k for k, c in zip(kids, ctxs, strict=True) if ":sealbus_t:" in c]
        if brokers:
            st = proc_status(brokers[0])
            caps = {k: int(st.get(k, "1"), 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
            user = st.get("Uid", "").split()
            ok = (len(set(user)) == 1 and user[0] != "0" and not any(caps.values())
                  and st.get("NoNewPrivs") == "1" and st.get("Seccomp") == "2")  # fmt: skip
            record(
                "broker: bus user, no capabilities, no_new_privs, seccomp",
                ok,
                f"Uid={st.get('Uid')} caps={caps} NoNewPrivs={st.get('NoNewPrivs')} Seccomp={st.get('Seccomp')}",
            )
        path = why.split("path=", 1)[1].split(",")[0]
        rc, out = probe("sealbus_demo_client_t", "connect", path)
        record(names[2], rc == 0, out)
        rc, out = probe("sealbus_demo_denied_t", "connect", path)
        record(names[3], rc == 1 and "EACCES" in out, out)
        # From the mount table: we (initrc_t, unconfined) may not even stat the payload fs,
        # sealbus_unconfined_use_payload_fs is off.
        fs = BUS_DIR / "fs"
        mounts = [ln for ln in Path("/proc/self/mounts").read_text().splitlines() if f" {fs} " in ln]
        if any(" fuse.sealbus " in ln and "context=" in ln and "sealbus_fs_t" in ln for ln in mounts):
            rc, out = probe("sealbus_demo_client_t", "seal-payload", str(fs))
            record(names[4], rc == 0, out)
            rc, out = probe("sealbus_demo_client_t", "claim", f"unix:path={path}", str(fs))
            record("demo_client claims its payload through the real bus and reads it back", rc == 0
                   and "payload-snapshot, identical bytes, read-only" in out, out)  # fmt: skip
            rc, out = probe("sealbus_demo_denied_t", "list", str(fs))
            record(names[5], rc == 1 and "EACCES" in out, out)
        else:
            why_fs = f"the system bus serves no payload fs at {fs} (mounts: {'; '.join(mounts) or 'none'})"
            record(names[4], False, why_fs)
            record(names[5], False, why_fs)
        rc, out = probe("sealbus_demo_client_t", "whoami", f"unix:path={path}")
        want = "sealbus_demo_client_t"
        record("GetConnectionSELinuxSecurityContext and GetConnectionCredentials give the real label",
               rc == 0 and out.count(f":{want}:") == 2, out)  # fmt: skip
        case_dbus_class(why, start, log)
        case_payload_store(brokers[0] if brokers else None)
        case_reload_without_sighup(why, log, start)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.thread.join(timeout=5)


DBUS_CASES = {
    "own": "dbus acquire_svc: service owns an unassociated name (against sealbus_t) and an associated one",
    "call": "dbus send_msg: client calls the service, the service's reply comes back",
    "send": "dbus send_msg: forbidden send denied + USER_AVC names both contexts",
    "acquire": "dbus acquire_svc: forbidden name denied + USER_AVC names both contexts",
    "acquire_bus": "dbus acquire_svc: unassociated name denied against the bus label (sealbus_t)",
    "logged": "dbus denials: the broker logs them, the service never saw the forbidden call",
    "unconfined": "an init script (initrc_t, unconfined) owns a name on the real bus: sealbus_system_bus_client/acquire_svc",
    "fd_memfd": "fd relay: client passes a sealed memfd through the bus, the service reads it",
    "fd_file": "fd relay: client passes a plain read-only file fd, the service reads it",
    "fd_forbidden": "fd relay: a pipe fd policy lets no broker receive: refused at recvmsg + AVC, never delivered",
}


def _denied(rc: int, out: str, stype: str, ttype: str) -> tuple[bool, str]:
    """An AccessDenied D-Bus error whose text names both contexts."""
    ok = rc == 2 and "org.freedesktop.DBus.Error.AccessDenied" in out
    ok = ok and f":{stype}:" in out and f":{ttype}:" in out
    return ok, out


def _user_avc(perm: str, since: float, stype: str, ttype: str, extra: str) -> tuple[bool, str]:
    """A USER_AVC record for perm from stype to ttype (tclass=dbus), written by the launcher."""
    found: list[dict[str, str]] = []

    def look() -> bool:
        found[:] = [r for r in user_avcs(perm, since)
                    if type_of(r.get("scontext", "")) == stype and type_of(r.get("tcontext", "")) == ttype
                    and extra in r["line"]]  # fmt: skip
        return bool(found)

    if not wait_for(look, 10):
        others = user_avcs(perm, since)
        return False, f"no USER_AVC {perm} {stype} -> {ttype} ({extra}); {len(others)} other(s): " + (
            others[0]["line"][-200:] if others else "none"
        )
    rec = found[0]
    subj_ok = ":sealbus_launch_t:" in rec.get("subj", "")  # written by the launcher for the broker
    return subj_ok, f"subj={rec.get('subj')} " + rec["line"].split("msg='", 1)[-1][:220]


def case_dbus_class(address: str | None, start: float, log: LauncherLog) -> None:
    """The broker's SELinux mediation on the real system bus (dbus-daemon semantics)."""
    if address is None:
        for name in DBUS_CASES.values():
            record(name, False, "the real bus did not start (see above)")
        return
    since = time.time()
    service = subprocess.Popen(probe_cmd("sealbus_demo_service_t", "serve", address,
                                         ",".join((SERVICE_NAME, OWNED_NAME))),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)  # fmt: skip
    lines: list[str] = []
    try:
        while True:
            line = service.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
            if line.startswith("READY"):
                break
        owned = [ln for ln in lines if ln.startswith("OWN")]
        record(DBUS_CASES["own"], len(owned) == 2 and all(" OK " in ln for ln in owned), "; ".join(lines))
        if not any(ln.startswith("READY") for ln in lines):
            for key in (
                "call",
                "send",
                "acquire",
                "acquire_bus",
                "logged",
                "unconfined",
                "fd_memfd",
                "fd_file",
                "fd_forbidden",
            ):
                record(DBUS_CASES[key], False, "the demo service did not come up: " + "; ".join(lines))
            return
        rc, out = probe("sealbus_demo_client_t", "call", address, SERVICE_NAME)
        record(DBUS_CASES["call"], rc == 0 and "pong from" in out and ":sealbus_demo_service_t:" in out, out)

        case_fd_relay(address, since)

        proc = sh(PYTHON, "-I", str(HERE / "probe.py"), "own", address, "org.sealbus.Demo.Init", timeout=120)
        out = (proc.stdout + proc.stderr).strip()
        record(DBUS_CASES["unconfined"], proc.returncode == 0 and "owns org.sealbus.Demo.Init" in out, out)

        rc, out = probe("sealbus_demo_stranger_t", "call", address, SERVICE_NAME)
        ok, detail = _denied(rc, out, "sealbus_demo_stranger_t", "sealbus_demo_service_t")
        audited, avc = _user_avc("send_msg", since, "sealbus_demo_stranger_t", "sealbus_demo_service_t", "member=Ping")
        record(DBUS_CASES["send"], ok and audited, f"{detail} | {avc}")

        rc, out = probe("sealbus_demo_stranger_t", "own", address, GUARDED_NAME)
        ok, detail = _denied(rc, out, "sealbus_demo_stranger_t", "sealbus_demo_name_t")
        audited, avc = _user_avc(
            "acquire_svc", since, "sealbus_demo_stranger_t", "sealbus_demo_name_t", f"service={GUARDED_NAME}"
        )
        record(DBUS_CASES["acquire"], ok and audited, f"{detail} | {avc}")

        rc, out = probe("sealbus_demo_client_t", "own", address, FREE_NAME)
        ok, detail = _denied(rc, out, "sealbus_demo_client_t", "sealbus_t")
        audited, avc = _user_avc("acquire_svc", since, "sealbus_demo_client_t", "sealbus_t", f"service={FREE_NAME}")
        record(DBUS_CASES["acquire_bus"], ok and audited, f"{detail} | {avc}")
    finally:
        try:
            rest, _ = service.communicate(input="", timeout=30)
        except subprocess.TimeoutExpired:
            service.kill()
            rest, _ = service.communicate()
        lines += [ln.strip() for ln in (rest or "").splitlines()]
    calls = [ln for ln in lines if ln.startswith("CALL") and ln.endswith(" Ping")]
    taken = [ln for ln in lines if ln.startswith("CALL") and ln.endswith(" TakeFd")]
    record(DBUS_CASES["fd_forbidden"] + " (service side)", len(taken) == 2,
           f"the service saw {len(taken)} TakeFd call(s) (2 allowed ones expected, the pipe never)")  # fmt: skip
    denials = [ln for ln in log.lines if "SELinux" in ln and "denied" in ln]
    record(
        DBUS_CASES["logged"],
        len(calls) == 1 and len(denials) >= 3,
        f"service saw {calls or 'no call'}; broker log: {len(denials)} denial line(s): "
        + (denials[0][-160:] if denials else "none"),
    )


def case_fd_relay(address: str, since: float) -> None:
    """fds through the real bus between two confined domains (sealbus_relay_fds, sealbus_receive_fds):
    the kernel checks fd use on the sender and the file type at the broker's recvmsg and again at the
    service's."""
    rc, out = probe("sealbus_demo_client_t", "send-fd", address, SERVICE_NAME, "memfd")
    record(DBUS_CASES["fd_memfd"], rc == 0 and "read b'sealed memfd payload'" in out
           and ":sealbus_demo_service_t:" in out, out)  # fmt: skip
    rc, out = probe("sealbus_demo_client_t", "send-fd", address, SERVICE_NAME, "file")
    record(DBUS_CASES["fd_file"], rc == 0 and 'read b\'"""One action' in out, out)
    rc, out = probe("sealbus_demo_client_t", "send-fd", address, SERVICE_NAME, "pipe")
    avcs = wait_for_avcs("sealbus_t", since, "tcontext=system_u:system_r:sealbus_demo_client_t")
    avcs = [a for a in avcs if "fifo_file" in a]
    record(DBUS_CASES["fd_forbidden"], rc == 2 and "Disconnected" in out and bool(avcs),
           f"{out} | {avcs[0][-200:] if avcs else 'no AVC sealbus_t -> sealbus_demo_client_t fifo_file'}")  # fmt: skip


RELOAD_CASES = {
    "store": f"payload store: the broker's store dir fd is {STORE_TYPE} (named type transition in the launcher)",
    "store_list": "payload store: the loaded policy lets the broker search /run/sealbus but not list it (dir read)",
    "config": "inotify: a changed config file is reloaded without SIGHUP (a name the new config denies)",
    "service": "inotify: a service file added to a watched service dir is activatable without SIGHUP",
    "watching": "inotify: the launcher watches every config and service dir (no 'not watching' line, no AVC)",
}


def case_payload_store(broker: int | None) -> None:
    """The payload store has its own type, so the broker gets it and not the runtime directory (issue 20)."""
    if broker is None:
        for key in ("store", "store_list"):
            record(RELOAD_CASES[key], False, "no broker process")
        return
    import selinux

    store = BUS_DIR / LAUNCHER_STORE_NAME
    held = []
    for fd in os.listdir(f"/proc/{broker}/fd"):
        link = f"/proc/{broker}/fd/{fd}"
        try:
            if os.readlink(link) == str(store):
                held.append(os.getxattr(link, "security.selinux").decode().rstrip("\0"))
        except OSError:
            continue
    record(RELOAD_CASES["store"], bool(held) and all(type_of(c) == STORE_TYPE for c in held),
           f"{store}: {held or 'no fd of the broker points to it'}")  # fmt: skip
    # Asked of the loaded kernel policy, for SELinux alone (Landlock would refuse the broker too).
    broker_ctx, runtime_ctx = context_of(broker), selinux.getfilecon(str(BUS_DIR))[1]
    dir_class = selinux.string_to_security_class("dir")
    allowed = {}
    for perm in ("search", "read"):
        bit = selinux.string_to_av_perm(dir_class, perm)
        avd = selinux.av_decision()
        selinux.security_compute_av(broker_ctx, runtime_ctx, dir_class, bit, avd)
        allowed[perm] = bool(avd.allowed & bit)
    record(RELOAD_CASES["store_list"], allowed == {"search": True, "read": False},
           f"{broker_ctx} -> {runtime_ctx} dir: {allowed}")  # fmt: skip


def _activatable(address: str) -> list[str]:
    from jeepney.bus_messages import message_bus

    with _bus(address) as conn:
        return _unwrap(conn.send_and_get_reply(message_bus.ListActivatableNames(), timeout=DBUS_TIMEOUT))[0]


def _own(address: str) -> str:
    """RELOAD_NAME requested by this process (initrc_t, unconfined): 'owns ...' or the D-Bus error."""
    try:
        return own(address, RELOAD_NAME)
    except DBusError as e:
        return str(e)


def case_reload_without_sighup(address: str, log: LauncherLog, start: float) -> None:
    """The launcher's inotify watches under enforcing: changes reach the bus with no SIGHUP sent."""

    def reloads() -> int:
        return sum("handed to the broker" in ln for ln in log.lines)

    before, n = _own(address), reloads()
    write_tier_config(f'  <policy context="mandatory"><deny own="{RELOAD_NAME}"/></policy>\n')
    after = [before]

    def refused() -> bool:
        after.append(_own(address))
        return "AccessDenied" in after[-1]

    denied = wait_for(refused, 90)
    record(RELOAD_CASES["config"], " owns " in before and denied,
           f"before: {before}; after: {after[-1]}; launcher reloads: {reloads() - n}")  # fmt: skip

    listed_before = _activatable(address)
    n = reloads()
    new = SERVICE_DIR / f".{ACTIVATABLE_NAME}.new"
    new.write_text(f"[D-BUS Service]\nName={ACTIVATABLE_NAME}\nExec=/bin/false\nUser=root\n")
    os.replace(new, SERVICE_DIR / f"{ACTIVATABLE_NAME}.service")
    listed = wait_for(lambda: ACTIVATABLE_NAME in _activatable(address), 90)
    record(RELOAD_CASES["service"], ACTIVATABLE_NAME not in listed_before and listed,
           f"ListActivatableNames has it: {listed}; launcher reloads: {reloads() - n}")  # fmt: skip

    unwatched = [ln for ln in log.lines if "not watching" in ln]
    avcs = [a for a in avc_denied("sealbus_launch_t", start) if "{ watch" in a]
    record(RELOAD_CASES["watching"], not unwatched and not avcs,
           "; ".join(unwatched[:3] + [a[-200:] for a in avcs[:2]]) or "every directory watched")  # fmt: skip


def table(results: list[Case]) -> str:
    w = max(len(c.name) for c in results)
    lines = [f"{'case':<{w}}  status  detail", f"{'-' * w}  ------  ------"]
    lines += [f"{c.name:<{w}}  {c.status:<6}  {' '.join(c.detail.split())[-160:]}" for c in results]
    counts = {s: sum(c.status == s for c in results) for s in ("PASS", "FAIL", "XFAIL")}
    lines.append(f"== {counts['PASS']} passed, {counts['FAIL']} failed, {counts['XFAIL']} xfail")
    return "\n".join(lines)


def case_systemd() -> None:
    """The packaged way: sealbus.socket + sealbus.service (Type=notify, the unit's hardening) in enforcing mode."""
    names = ["systemd: sealbus.service active (READY=1 from the launcher)",
             "systemd: launcher in sealbus_launch_t, broker in sealbus_t",
             "systemd: demo_client connects to /run/sealbus/system_bus_socket"]  # fmt: skip
    if not Path("/run/systemd/system").is_dir():
        for name in names:
            record(name, False, "systemd is not running in the guest")
        return
    start = sh("systemctl", "start", "sealbus.socket", "sealbus.service", timeout=180)
    try:
        active = sh("systemctl", "is-active", "sealbus.service").stdout.strip()
        status = sh("systemctl", "status", "--no-pager", "-l", "sealbus.service").stdout
        record(names[0], start.returncode == 0 and active == "active",
               f"{active}; {start.stderr.strip()[-200:]} {status.strip()[-400:]}")  # fmt: skip
        main_pid = int(sh("systemctl", "show", "-p", "MainPID", "--value", "sealbus.service").stdout.strip() or 0)
        ctxs = [context_of(k) for k in children(main_pid)] if main_pid else []
        launcher = context_of(main_pid) if main_pid else "no main pid"
        record(names[1], ":sealbus_launch_t:" in launcher and any(":sealbus_t:" in c for c in ctxs),
               f"launcher {launcher}; children {'; '.join(ctxs) or 'none'}")  # fmt: skip
        rc, out = probe("sealbus_demo_client_t", "connect", "/run/sealbus/system_bus_socket")
        record(names[2], rc == 0, out)
    finally:
        sh("systemctl", "stop", "sealbus.service", "sealbus.socket", timeout=60)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="sealbus enforcing SELinux tier (run as root in the guest)")
    parser.add_argument("--out", type=Path, help="write results as JSON here")
    args = parser.parse_args(argv)
    global RESULTS_DIR
    if args.out:
        RESULTS_DIR = args.out.resolve().parent
    PROBE_DIR.mkdir(exist_ok=True)
    sh("chcon", "-t", "sealbus_runtime_t", str(PROBE_DIR))
    start = time.time()
    return run_steps(
        (
            case_platform,
            lambda: case_socket(start),
            lambda: case_payload_fs(start),
            lambda: case_real_bus(start),
            case_systemd,
        ),
        args.out,
    )


def run_steps(steps, out: Path | None) -> int:
    """Run a tier's steps, print its table, write its JSON to ``out``; 1 if any case failed."""
    for step in steps:
        try:
            step()
        except Exception as e:  # a broken step is a failure, never a skip
            record(f"step {getattr(step, '__name__', 'case')} crashed", False, repr(e))
    print(table(RESULTS))
    if out:
        out.write_text(json.dumps([asdict(c) for c in RESULTS], indent=2))
    return 1 if any(c.status == "FAIL" for c in RESULTS) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
