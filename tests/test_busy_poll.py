"""Adaptive busy polling: the window follows the traffic, a quiet bus never
spins, and the knob is validated wherever it can be set."""

import os
import subprocess
import sys
import time

import pytest
from jeepney import DBusAddress, new_method_call
from jeepney.io.blocking import open_dbus_connection

from broker.access.config import ConfigError
from broker.access.config_settings import settings_from_file
from broker.io.busy_poll import GROW_START, PollWindow
from tests.conftest import start_sealbus

SEALBUS = os.path.join(os.path.dirname(sys.executable), "sealbus")
US = 1e-6


def test_window_grows_while_messages_follow_closely_and_is_capped():
    pw = PollWindow(50 * US)
    assert pw.window == 0  # a new bus sleeps
    pw.waited(30 * US)
    assert pw.window == GROW_START
    for _ in range(10):
        pw.waited(45 * US)
    assert pw.window == 50 * US  # capped at the maximum
    pw.waited(20 * US)  # caught inside the window: no change
    assert pw.window == 50 * US


def test_window_shrinks_to_zero_when_traffic_is_sparse():
    pw = PollWindow(50 * US)
    for _ in range(10):
        pw.waited(45 * US)
    pw.waited(5e-3)
    assert pw.window == 25 * US
    for _ in range(10):
        pw.waited(float("inf"))
    assert pw.window == 0


def test_zero_maximum_never_polls():
    pw = PollWindow(0)
    for _ in range(10):
        pw.waited(1 * US)
    assert pw.window == 0


def test_launcher_hands_the_maximum_to_the_broker(tmp_path):
    """--system: the launcher reads the config as root and the sandboxed broker gets the value."""
    import pwd

    from broker.access.config import load_config
    from broker.launch.broker_process import settings_from_message
    from broker.launch.launcher import broker_settings

    cfg = load_config(_config(tmp_path, '<busy_poll max_us="7"/>'))
    msg = broker_settings(cfg, pwd.getpwuid(os.getuid()))
    assert settings_from_message(msg).busy_poll_us == 7
    cfg = load_config(_config(tmp_path, ""))
    assert settings_from_message(broker_settings(cfg, pwd.getpwuid(os.getuid()))).busy_poll_us == 50


def _config(tmp_path, element: str):
    p = tmp_path / "bus.conf"
    p.write_text(f'<busconfig><listen>unix:path={tmp_path}/s</listen><auth>EXTERNAL</auth>'
                 f'<sealbus>{element}</sealbus></busconfig>')  # fmt: skip
    return str(p)


def test_config_element_sets_the_maximum(tmp_path):
    settings, _ = settings_from_file(_config(tmp_path, '<busy_poll max_us="0"/>'))
    assert settings.busy_poll_us == 0


@pytest.mark.parametrize("attrs", ['max_us="fast"', 'max_us="-1"', 'max_us="5000"', "", 'max_us="5" x="1"'])
def test_config_element_is_validated(tmp_path, attrs):
    with pytest.raises(ConfigError):
        settings_from_file(_config(tmp_path, f"<busy_poll {attrs}/>"))


@pytest.mark.parametrize("value", ["-1", "5000", "soon"])
def test_command_line_value_is_validated(tmp_path, value):
    r = subprocess.run([SEALBUS, "run", "--address", f"unix:path={tmp_path}/s", "--busy-poll", value],
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.returncode == 2 and "--busy-poll" in r.stderr


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_paced_traffic_does_not_make_the_broker_spin(tmp_path):
    """Calls 2 ms apart with the longest window allowed (1 ms): a window that did not
    shrink would burn half a core; the adaptive one lets the broker sleep between calls."""
    bus = start_sealbus(tmp_path, "--busy-poll", "1000")
    try:
        conn = open_dbus_connection(bus.address)
        dbus = DBusAddress("/org/freedesktop/DBus", bus_name="org.freedesktop.DBus",
                           interface="org.freedesktop.DBus")  # fmt: skip
        conn.send_and_get_reply(new_method_call(dbus, "GetId"), timeout=10)
        cpu0, t0 = _cpu_seconds(bus.pid), time.monotonic()
        for _ in range(400):
            conn.send_and_get_reply(new_method_call(dbus, "GetId"), timeout=10)
            time.sleep(0.002)
        cpu, wall = _cpu_seconds(bus.pid) - cpu0, time.monotonic() - t0
        conn.close()
        assert cpu < 0.25 * wall, f"broker used {cpu:.2f} s of CPU in {wall:.2f} s of paced calls"
    finally:
        bus.stop()
