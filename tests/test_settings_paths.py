"""Every way a bus is configured gives it the same limits (they had drifted: only one path capped the message size)."""

import pwd

from broker.access.config import load_config
from broker.access.config_settings import settings_from_config
from broker.launch.broker_process import settings_from_message
from broker.launch.launcher import broker_settings

CONFIG = """<busconfig>
  <type>{type}</type>
  <listen>unix:path=/nonexistent/sock</listen>
  <policy context="default"><allow send_destination="*"/><allow own="*"/></policy>
  <limit name="max_message_size">1073741824</limit>
  <limit name="max_match_rules_per_connection">77</limit>
</busconfig>
"""


def _paths(tmp_path, bus_type):
    f = tmp_path / "bus.conf"
    f.write_text(CONFIG.format(type=bus_type))
    cfg = load_config(str(f))
    direct = settings_from_config(cfg).limits  # sealbus run --config, sealbus dbus-daemon without <user>
    handed = settings_from_message(broker_settings(load_config(str(f)), pwd.getpwuid(0))).limits  # --system, <user>
    return direct, handed


def test_config_and_launcher_paths_agree_on_every_limit(tmp_path):
    for bus_type in ("system", "session"):
        direct, handed = _paths(tmp_path, bus_type)
        assert vars(direct) == vars(handed), bus_type


def test_no_path_lets_a_message_exceed_the_protocol_maximum(tmp_path):
    for bus_type in ("system", "session"):
        for lim in _paths(tmp_path, bus_type):
            assert lim.max_message_size == 128 * 1024 * 1024  # the D-Bus specification's maximum, pinned
            assert lim.max_match_rules_per_connection == 77
