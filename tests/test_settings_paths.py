"""Every way a bus is configured gives it the same limits (they had drifted: only one path capped the message size)."""

import logging
import pwd

import pytest

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


# -- one settings object, carried whole to the broker ---------------------------------------

EVERY_OPTION = """<busconfig>
  <type>system</type>
  <listen>unix:path=/nonexistent/sock</listen>
  <auth>EXTERNAL</auth>
  <policy context="default"><allow send_destination="*"/><allow own="*"/><deny own="org.example.No"/></policy>
  <limit name="max_names_per_connection">33</limit>
  <selinux><associate own="org.example.A" context="system_u:object_r:example_t:s0"/></selinux>
  <sealbus>
    <fds mode="sealed"/>
    <payload_fs mount="/nonexistent/fs" timeout_ms="1234" max_bytes_per_user="5678"/>
    <busy_poll max_us="9"/>
    <sandbox landlock="required" seccomp="required"/>
  </sealbus>
</busconfig>
"""


def _over_the_channel(msg: dict) -> dict:
    """The bytes the control channel carries, decoded as the broker decodes them."""
    import json

    from broker.io.control import encode

    data = encode(msg)
    return json.loads(data[4:])


def _unlike_default(f, settings):
    """A value for field ``f`` that differs from its default, chosen from its declared type."""
    from broker.bus.limits import Limits
    from broker.bus.settings import ServiceDir

    default = getattr(settings, f.name)
    if f.name == "policy":
        return _compiled_policy(EVERY_OPTION)
    if isinstance(default, Limits):
        lim = Limits()
        lim.update({"max_names_per_connection": 3, "auth_timeout": 4})
        return lim
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 7
    if isinstance(default, str) or f.type in (str | None,):
        return f"{f.name}-set"
    if isinstance(default, tuple):
        return (*default, "ANONYMOUS")
    if f.type == list[ServiceDir]:  # the flags too, not only the paths
        return [*default, ServiceDir(f"/{f.name}-set", strict_naming=True, watch=False)]
    if isinstance(default, list):
        return [*default, f"/{f.name}-set"]
    if isinstance(default, dict):
        return {"org.example.Name": "a_u:b_r:c_t:s0"}
    raise AssertionError(f"BusSettings.{f.name}: teach this test a non-default value of its type")


def _compiled_policy(text: str):
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".conf") as f:
        f.write(text)
        f.flush()
        return load_config(f.name).policy


def test_every_setting_reaches_the_broker():
    """A field added to BusSettings travels to the broker unless declared process-local (LOCAL): set each to
    a non-default value, send it through the control channel's encoding, and read it back."""
    from dataclasses import fields

    from broker.access.config_settings import settings_from_message, settings_to_message
    from broker.bus.settings import BusSettings

    sent = BusSettings()
    for f in fields(sent):
        if not f.metadata.get("local"):
            setattr(sent, f.name, _unlike_default(f, sent))
    got = settings_from_message(_over_the_channel(settings_to_message(sent, uid=1, gid=2)))
    for f in fields(sent):
        if f.metadata.get("local"):
            continue
        want, have = getattr(sent, f.name), getattr(got, f.name)
        if f.name == "policy":
            want, have = want.to_json(), have.to_json()
        elif f.name == "limits":
            want, have = vars(want), vars(have)
        assert have == want, f"BusSettings.{f.name} changed on its way to the broker"
        assert have != getattr(BusSettings(), f.name) or f.name == "policy", f.name


def test_config_and_launcher_paths_build_the_same_settings(tmp_path):
    """`sealbus run --config` / the drop-in without <user> (in-process) and `run --system` / the drop-in with
    <user> (launcher -> broker) give the broker the same settings, field by field, for a config that sets
    every option; only the payload fs differs (the launcher names what it mounted)."""
    from broker.access.config_settings import settings_from_message, settings_to_message

    f = tmp_path / "bus.conf"
    f.write_text(EVERY_OPTION)
    direct = settings_from_config(load_config(str(f)))
    msg = _over_the_channel(broker_settings(load_config(str(f)), pwd.getpwuid(0), payload_mount="/run/x/fs"))
    assert (msg["uid"], msg["gid"]) == (0, 0)
    handed = settings_from_message(msg)
    assert handed.payload_fs == "/run/x/fs"
    handed.payload_fs = direct.payload_fs
    assert settings_to_message(handed) == settings_to_message(direct)
    # and the config's options did arrive (not two equal sets of defaults)
    assert (handed.fd_mode, handed.payload_timeout_ms, handed.payload_max_bytes_per_user) == ("sealed", 1234, 5678)
    assert (handed.busy_poll_us, handed.landlock, handed.seccomp) == (9, "required", "required")
    assert handed.selinux_associations == {"org.example.A": "system_u:object_r:example_t:s0"}
    assert handed.limits.max_names_per_connection == 33 and handed.bus_type == "system"
    assert not handed.policy.check_own(_creds(1000), "org.example.No").allowed


def test_command_line_overrides_reach_both_paths(tmp_path):
    """--fd-mode, --busy-poll and --systemd-activation are settings like the config's: same function, both paths."""
    from broker.access.config_settings import settings_from_message

    f = tmp_path / "bus.conf"
    f.write_text(CONFIG.format(type="system"))
    over = {"fd_mode": "none", "busy_poll_us": 0, "systemd_activation": True}
    direct = settings_from_config(load_config(str(f)), **over)
    handed = settings_from_message(broker_settings(load_config(str(f)), pwd.getpwuid(0), **over))
    for name, value in over.items():
        assert getattr(direct, name) == getattr(handed, name) == value, name


def test_a_broker_refuses_settings_it_does_not_know():
    """A launcher newer than its broker: refused at start-up, not silently dropped."""
    import pytest

    from broker.access.config_settings import settings_from_message, settings_to_message
    from broker.bus.settings import BusSettings

    msg = settings_to_message(BusSettings(), uid=1, gid=1)
    msg["service_dirs_from_the_future"] = ["/x"]
    with pytest.raises(ValueError, match="service_dirs_from_the_future"):
        settings_from_message(msg)
    with pytest.raises(TypeError):
        settings_from_config(None, no_such_setting=1)


def _creds(uid):
    from broker.bus.peer import Creds

    return Creds(uid, (uid,))


def test_the_launchers_catalogue_and_service_dirs_reach_the_broker(tmp_path):
    """The launcher reads the service directories (the sandboxed broker may not) and sends the catalogue beside
    the settings; the directories travel as a setting, flags included."""
    from broker.bus.settings import ServiceDir
    from broker.launch.broker_process import launcher_catalog

    services = tmp_path / "services"
    services.mkdir()
    (services / "org.example.Svc.service").write_text(
        "[D-BUS Service]\nName=org.example.Svc\nExec=/bin/true\nUser=root\n"
    )
    f = tmp_path / "bus.conf"
    f.write_text(CONFIG.format(type="system").replace("<listen>", f"<servicedir>{services}</servicedir><listen>"))
    msg = _over_the_channel(broker_settings(load_config(str(f)), pwd.getpwuid(0)))
    assert settings_from_message(msg).servicedirs == [ServiceDir(str(services))]
    assert launcher_catalog(msg).names() == ["org.example.Svc"]
    assert launcher_catalog({"type": "settings"}).names() == []  # none sent: nothing to activate, nothing read


# -- limits that are accepted but do not bound what their name says: the log says so ----------------


def _limit_log(caplog, limits: dict[str, int]) -> str:
    from broker.access.config import parse_config_string

    body = "".join(f'<limit name="{n}">{v}</limit>' for n, v in limits.items())
    with caplog.at_level(logging.INFO, logger="sealbus.config"):
        parse_config_string(f"<busconfig>{body}</busconfig>", filename="t.conf")
    return caplog.text


def test_limits_sealbus_bounds_otherwise_are_logged(caplog):
    """max_incoming_* (dbus-daemon's queue of read, undispatched messages, which sealbus does not have)."""
    text = _limit_log(caplog, {"max_incoming_bytes": 1000, "max_incoming_unix_fds": 10})
    for name in ("max_incoming_bytes", "max_incoming_unix_fds"):
        assert f"<limit name='{name}'> accepted; sealbus bounds this otherwise" in text, text


def test_a_message_size_over_the_protocol_maximum_is_logged_as_capped(caplog):
    """Debian's session.conf asks for 1000000000: the bus caps it at 128 MiB (as libdbus) and says so."""
    text = _limit_log(caplog, {"max_message_size": 1000000000})
    assert "<limit name='max_message_size'> 1000000000 is over the protocol's maximum" in text, text
    assert "134217728" in text, text
    caplog.clear()
    assert "max_message_size" not in _limit_log(caplog, {"max_message_size": 1024})


# -- AppArmor: sealbus does not mediate with it, and says so instead of dropping the config's word -------


def _apparmor_settings(caplog, monkeypatch, element: str, host_mediates: bool):
    from broker.access import config_settings
    from broker.access.config import parse_config_string

    monkeypatch.setattr(config_settings, "apparmor_dbus_mediation", lambda: host_mediates)
    cfg = parse_config_string(f"<busconfig><type>system</type>{element}</busconfig>")
    with caplog.at_level(logging.WARNING, logger="sealbus.config"):
        return settings_from_config(cfg)


def test_apparmor_required_stops_start_up_with_a_clear_error(caplog, monkeypatch):
    """dbus-daemon refuses to start when <apparmor mode="required"/> cannot be honoured; sealbus never can."""
    from broker.access.config import ConfigError

    for host in (False, True):
        with pytest.raises(ConfigError, match="AppArmor"):
            _apparmor_settings(caplog, monkeypatch, '<apparmor mode="required"/>', host)


@pytest.mark.parametrize("element", ["", "<apparmor/>", '<apparmor mode="enabled"/>'])
def test_a_host_whose_kernel_mediates_dbus_with_apparmor_is_warned(caplog, monkeypatch, element):
    """Where dbus-daemon would enforce the dbus rules of AppArmor profiles (mode enabled, the default, and a
    kernel with D-Bus mediation), sealbus does not: the log says so at every start."""
    _apparmor_settings(caplog, monkeypatch, element, True)
    assert "AppArmor" in caplog.text and "not enforced" in caplog.text, caplog.text


@pytest.mark.parametrize(("element", "host"), [('<apparmor mode="disabled"/>', True), ("", False)])
def test_no_apparmor_warning_where_dbus_daemon_would_not_mediate_either(caplog, monkeypatch, element, host):
    _apparmor_settings(caplog, monkeypatch, element, host)
    assert "AppArmor" not in caplog.text, caplog.text


def test_apparmor_detection_reads_the_kernels_dbus_feature(tmp_path):
    from broker.access.config_settings import apparmor_dbus_mediation

    assert apparmor_dbus_mediation(root=str(tmp_path)) is False
    (tmp_path / "sys/module/apparmor/parameters").mkdir(parents=True)
    (tmp_path / "sys/module/apparmor/parameters/enabled").write_text("Y\n")
    assert apparmor_dbus_mediation(root=str(tmp_path)) is False  # AppArmor on, but no D-Bus mediation (Debian)
    (tmp_path / "sys/kernel/security/apparmor/features/dbus").mkdir(parents=True)
    (tmp_path / "sys/kernel/security/apparmor/features/dbus/mask").write_text("acquire send receive\n")
    assert apparmor_dbus_mediation(root=str(tmp_path)) is True  # e.g. Ubuntu's kernels
    (tmp_path / "sys/module/apparmor/parameters/enabled").write_text("N\n")
    assert apparmor_dbus_mediation(root=str(tmp_path)) is False


def test_no_apparmor_probe_where_selinux_is_the_lsm(caplog, monkeypatch):
    """Under SELinux the probe's sysfs read is denied to the launcher's domain (an AVC the system-bus VM tier
    catches), and AppArmor cannot be the major LSM anyway: the probe is not made."""
    from broker.access import config_settings
    from broker.access.config import parse_config_string

    def probe():
        raise AssertionError("AppArmor probed on an SELinux host")

    monkeypatch.setattr(config_settings, "_selinux_is_the_lsm", lambda: True)
    monkeypatch.setattr(config_settings, "apparmor_dbus_mediation", probe)
    with caplog.at_level(logging.WARNING, logger="sealbus.config"):
        settings_from_config(parse_config_string("<busconfig><type>system</type></busconfig>"))
    assert "AppArmor" not in caplog.text
