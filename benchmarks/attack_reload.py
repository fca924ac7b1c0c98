"""Attack (not a test): a flood of service files and of ReloadConfig calls.

    .venv/bin/python -m benchmarks.attack_reload [--files N] [--calls K]

Against sealbus reading its own config (`sealbus run --config`), the privilege-separated system bus (root
only: `sealbus run --system`, where the launcher re-reads) and dbus-daemon, each with one watched service
directory: N service files written into it one by one (inotify), then K ReloadConfig calls pipelined on one
connection. Printed: seconds until ListActivatableNames shows all N, seconds until all K calls are answered,
and for sealbus how many reloads that took (its log's "configuration reloaded" lines; on the system bus the
launcher and the broker each log one per reload).
"""

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from jeepney import message_bus, new_method_call
from jeepney.io.blocking import open_dbus_connection

ROOT = Path(__file__).resolve().parent.parent
SEALBUS = str(ROOT / ".venv" / "bin" / "sealbus")
CONF = """<busconfig><type>{type}</type><listen>unix:tmpdir=/tmp</listen><servicedir>{svc}</servicedir>
  <policy context="default"><allow user="*"/><allow send_destination="*" eavesdrop="true"/>
  <allow eavesdrop="true"/><allow own="*"/></policy></busconfig>"""


def start(kind: str, root: Path) -> tuple[subprocess.Popen, str]:
    system = kind == "sealbus --system"
    (root / "svc").mkdir()
    (root / "sock").mkdir()
    conf = root / "bus.conf"
    conf.write_text(CONF.format(type="system" if system else "session", svc=root / "svc"))
    log = open(root / "bus.log", "w")
    if kind == "dbus-daemon":
        argv = ["dbus-daemon", f"--config-file={conf}", "--nofork", "--print-address=1",
                f"--address=unix:path={root / 'sock' / 'bus'}"]  # fmt: skip
    elif system:
        argv = [SEALBUS, "run", "--system", "--runtime-dir", str(root / "sock"), "--config", str(conf)]
    else:
        argv = [SEALBUS, "run", "--config", str(conf), "--address", f"unix:path={root / 'sock' / 'bus'}"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True)
    return proc, proc.stdout.readline().strip().split(",guid=")[0]


def activatable(address: str) -> int:
    with open_dbus_connection(address) as c:
        return len(c.send_and_get_reply(new_method_call(message_bus, "ListActivatableNames"), timeout=30).body[0])


def run(kind: str, files: int, calls: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="sealbus-attack-reload-"))
    root.chmod(0o755)
    proc, address = start(kind, root)
    try:
        user = "User=root\n" if kind == "sealbus --system" else ""
        t0 = time.monotonic()
        for i in range(files):
            name = f"org.example.Flood{i}"
            (root / "svc" / f"{name}.service").write_text(f"[D-BUS Service]\nName={name}\nExec=/bin/false\n{user}")
        while activatable(address) < files + 1 and time.monotonic() - t0 < 120:
            time.sleep(0.05)
        t1 = time.monotonic()
        before = (root / "bus.log").read_text().count("configuration reloaded")
        with open_dbus_connection(address) as c:
            for _ in range(calls):
                c.send(new_method_call(message_bus, "ReloadConfig"))
            answered = 0
            while answered < calls:
                answered += c.receive(timeout=60).header.message_type.name != "signal"
        t2 = time.monotonic()
        after = (root / "bus.log").read_text().count("configuration reloaded")
        extra = (
            ""
            if kind == "dbus-daemon"
            else f"; reload log lines: {before} for the files, {after - before} for the calls"
        )
        listed, answered_in = f"{t1 - t0:.2f}", f"{t2 - t1:.2f}"
        print(f"{kind}: {files} files listed after {listed} s; {calls} ReloadConfig answered in {answered_in} s{extra}")
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--calls", type=int, default=300)
    a = p.parse_args()
    kinds = ["sealbus"] + (["sealbus --system"] if os.geteuid() == 0 else []) + ["dbus-daemon"]
    for kind in kinds:
        run(kind, a.files, a.calls)


if __name__ == "__main__":
    main()
