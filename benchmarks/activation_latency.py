"""Bus activation, end to end: from a call to an unowned activatable name to its reply.

    .venv/bin/python -m benchmarks.activation_latency [--rounds 20]

For dbus-daemon and sealbus (the dbus-daemon drop-in, as the invoking user:
the session spawn helper starts the service), the same config and service
file: each round calls ``Echo`` on the service's name (auto-start: spawn,
connect, RequestName, delivery of the queued call, reply), then ``Exit`` and
waits for the name to go. The service is tests/activation_service.py (a
Python process: its start-up dominates). Prints the median and the 90th
percentile of each, in milliseconds.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jeepney import DBusAddress, new_method_call
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "tests" / "activation_service.py"
DAEMONS = {"dbus-daemon": "/usr/bin/dbus-daemon", "sealbus": str(ROOT / ".venv" / "bin" / "sealbus-dbus-daemon")}
NAME = "org.example.Bench"


def run(daemon: str, rounds: int) -> list[float]:
    d = Path(tempfile.mkdtemp(prefix="sealbus-actbench-"))
    (d / "services").mkdir()
    (d / "markers").mkdir()
    (d / "services" / f"{NAME}.service").write_text(
        f"[D-BUS Service]\nName={NAME}\nExec={sys.executable} {SERVICE} {NAME} {d / 'markers'}\n"
    )
    conf = d / "bus.conf"
    conf.write_text(f'<busconfig><type>session</type><listen>unix:path={d}/bus</listen>'
                    f"<servicedir>{d / 'services'}</servicedir><policy context=\"default\">"
                    '<allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/><allow own="*"/>'
                    "</policy></busconfig>")  # fmt: skip
    proc = subprocess.Popen([daemon, f"--config-file={conf}", "--nofork", "--print-address=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    address = proc.stdout.readline().strip().split(",guid=")[0]
    out = []
    try:
        with open_dbus_connection(address) as c:
            svc = DBusAddress("/org/example/Svc", bus_name=NAME, interface="org.example.Svc")
            for _ in range(rounds):
                t0 = time.perf_counter()
                reply = c.send_and_get_reply(new_method_call(svc, "Echo", "s", ("x",)), timeout=30)
                out.append((time.perf_counter() - t0) * 1000)
                assert reply.body[0] == "x", reply
                c.send_and_get_reply(new_method_call(svc, "Exit"), timeout=30)
                while c.send_and_get_reply(message_bus.NameHasOwner(NAME)).body[0]:
                    time.sleep(0.005)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    a = ap.parse_args()
    for label, daemon in DAEMONS.items():
        ms = sorted(run(daemon, a.rounds))
        p90 = ms[int(0.9 * (len(ms) - 1))]
        print(f"{label:12s} auto-start to reply: median {statistics.median(ms):6.1f} ms, p90 {p90:6.1f} ms "
              f"({len(ms)} rounds)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
