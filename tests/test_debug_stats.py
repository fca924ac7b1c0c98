"""org.freedesktop.DBus.Debug.Stats shows every connection's match rules (object paths with session ids)
and counters: on a bus with a policy only root, the bus's own uid and callers the policy explicitly
allows may read them, whatever catch-all allow the policy has; a bus without a policy answers anyone."""

import logging
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from broker.access.config import parse_config_string
from broker.access.mediator import BusPolicy

from .conftest import CoreClient, have, run_as, start_sealbus

DENIED = "org.freedesktop.DBus.Error.AccessDenied"
STATS = "org.freedesktop.DBus.Debug.Stats"
USER, READER = 1000, 1001

# a multi-user bus whose policy lets everyone talk to everything, the bus driver included (no rule
# names Debug.Stats); READER is explicitly allowed the interface
CATCH_ALL = """<busconfig><type>system</type><policy context="default">
  <allow user="*"/><allow own="*"/><allow send_destination="*"/><allow receive_sender="*"/>
  <allow send_destination="org.freedesktop.DBus"/>
</policy>
<policy user="{reader}">
  <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Debug.Stats"/>
</policy></busconfig>"""

SECRET_RULE = "type='signal',path='/org/freedesktop/login1/session/_32'"


@pytest.fixture
def bus(core):
    core.policy = BusPolicy(parse_config_string(CATCH_ALL.format(reader=READER)).policy)
    return core


def stats_call(c: CoreClient, member: str, signature: str = "", body: tuple = (), interface=STATS):
    c.call(member, signature, body, interface=interface)
    (h, reply), *_ = c.take()
    return (h.error_name, reply[0]) if h.error_name else (None, reply[0])


def with_a_secret_rule(core) -> CoreClient:
    victim = CoreClient(core, uid=2000, gids=(2000,))
    victim.call("AddMatch", "s", (SECRET_RULE,))
    victim.take()
    return victim


@pytest.mark.parametrize("member,signature", [("GetAllMatchRules", ""), ("GetConnectionStats", "s"),
                                              ("GetStats", "")])  # fmt: skip
def test_unprivileged_caller_is_denied_on_a_policy_bus_only(core, member, signature, caplog):
    victim = with_a_secret_rule(core)
    spy = CoreClient(core, uid=USER, gids=(USER,), pid=777)
    args = (victim.name,) if signature else ()
    assert stats_call(spy, member, signature, args)[0] is None  # no policy: one user's bus, as before
    core.policy = BusPolicy(parse_config_string(CATCH_ALL.format(reader=READER)).policy)
    with caplog.at_level(logging.WARNING, "sealbus.driver"):
        err, text = stats_call(spy, member, signature, args)
    assert err == DENIED, (err, text)
    assert SECRET_RULE not in text and "uid 1000" in text and "explicitly allows" in text
    assert any(f"uid={USER} pid=777 label=-" in r.getMessage() and member in r.getMessage() for r in caplog.records)


def test_without_an_interface_field_the_call_is_still_denied(bus):
    """The driver finds the method by member alone; the policy question is still about Debug.Stats."""
    with_a_secret_rule(bus)
    spy = CoreClient(bus, uid=USER, gids=(USER,))
    assert stats_call(spy, "GetAllMatchRules", interface=None)[0] == DENIED


def test_root_and_the_explicitly_allowed_user_read_stats(bus):
    victim = with_a_secret_rule(bus)
    assert stats_call(CoreClient(bus, uid=USER, gids=(USER,)), "GetAllMatchRules")[0] == DENIED
    for uid in (0, os.getuid(), READER):
        c = CoreClient(bus, uid=uid, gids=(uid,))
        err, rules = stats_call(c, "GetAllMatchRules")
        assert err is None and rules[victim.name] == [SECRET_RULE], (uid, err, rules)
        err, st = stats_call(c, "GetConnectionStats", "s", (victim.name,))
        assert err is None and st["MatchRules"][1] == 1
        assert stats_call(c, "GetStats")[0] is None


def test_the_last_rule_naming_debug_stats_decides_not_a_later_catch_all(core):
    """USER's own deny of Debug.Stats is not undone by a catch-all allow that comes later (mandatory);
    READER's explicit allow is not hidden by it either."""
    xml = CATCH_ALL.format(reader=READER).replace(
        "</policy></busconfig>",
        f"""</policy>
      <policy user="{USER}"><deny send_destination="org.freedesktop.DBus" send_interface="{STATS}"/></policy>
      <policy context="mandatory"><allow send_destination="org.freedesktop.DBus"/></policy></busconfig>""",
    )
    core.policy = BusPolicy(parse_config_string(xml).policy)
    user, reader = CoreClient(core, uid=USER, gids=(USER,)), CoreClient(core, uid=READER, gids=(READER,))
    assert stats_call(user, "GetAllMatchRules")[0] == DENIED
    assert stats_call(reader, "GetAllMatchRules")[0] is None


# -- the same through real processes and a real client ------------------------------------------


def dbus_send(user, address: str, member: str, *args: str) -> subprocess.CompletedProcess:
    argv = ["dbus-send", f"--bus={address}", "--print-reply", "--dest=org.freedesktop.DBus",
            "/org/freedesktop/DBus", f"{STATS}.{member}", *args]  # fmt: skip
    return run_as(user, argv) if user is not None else subprocess.run(argv, capture_output=True, text=True,
                                                                      timeout=30)  # fmt: skip


@pytest.mark.skipif(not have("dbus-send"), reason="no dbus-send")
def test_dbus_send_as_other_users_on_a_policy_bus_only(tmp_path, test_users):
    spy, reader = test_users
    conf = Path(tempfile.mkdtemp(prefix="sealbus-stats-")) / "bus.conf"
    conf.parent.chmod(0o755)
    conf.write_text(CATCH_ALL.format(reader=reader.pw_name))
    bus = start_sealbus(tmp_path, "--config", str(conf))
    try:
        for member, args in (("GetAllMatchRules", ()), ("GetConnectionStats", ("string:org.freedesktop.DBus",))):
            out = dbus_send(spy, bus.address, member, *args)
            assert out.returncode != 0 and DENIED in out.stderr, (member, out.stdout, out.stderr)
            for user in (None, reader):  # root; the user the policy names
                out = dbus_send(user, bus.address, member, *args)
                assert out.returncode == 0 and "array [" in out.stdout, (member, out.stderr)
        assert f"uid={spy.pw_uid}" in Path(bus.log_path).read_text()
    finally:
        bus.stop()
    plain = start_sealbus(tmp_path, name="plain")  # no policy: the same user is answered, as before
    try:
        out = dbus_send(spy, plain.address, "GetAllMatchRules")
        assert out.returncode == 0 and "array [" in out.stdout, out.stderr
    finally:
        plain.stop()
