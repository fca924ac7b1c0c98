"""Where and under which name the driver answers, as dbus-daemon (driver.c's interface and method
flags, checked side by side with /usr/bin/dbus-daemon): org.freedesktop.DBus, Peer and Introspectable
at any object path, every other interface only at /org/freedesktop/DBus (elsewhere it does not
exist: UnknownInterface), and UpdateActivationEnvironment only at the canonical path (AccessDenied)."""

import os

import pytest

from .conftest import CoreClient

E = "org.freedesktop.DBus.Error."
PATH = "/org/freedesktop/DBus"


def _answer(c: CoreClient, member, signature="", body=(), *, path=PATH, interface="org.freedesktop.DBus"):
    serial = c.call(member, signature, body, path=path, interface=interface)
    ((h, out),) = [m for m in c.take() if m[0].reply_serial == serial]
    return (h.error_name, out[0]) if h.type == 3 else (None, out)


@pytest.mark.parametrize("path", ["/", "/x/y", PATH])
def test_traditional_methods_are_answered_at_any_path(core, path):
    c = CoreClient(core)
    assert _answer(c, "GetId", path=path) == (None, (core.guid,))
    assert _answer(c, "NameHasOwner", "s", (c.name,), path=path) == (None, (True,))
    assert _answer(c, "Ping", path=path, interface="org.freedesktop.DBus.Peer") == (None, ())
    assert _answer(c, "Introspect", path=path, interface="org.freedesktop.DBus.Introspectable")[0] is None


@pytest.mark.parametrize("call", [
    ("Get", "ss", ("org.freedesktop.DBus", "Features"), "org.freedesktop.DBus.Properties"),
    ("GetAll", "s", ("org.freedesktop.DBus",), "org.freedesktop.DBus.Properties"),
    ("Set", "ssv", ("org.freedesktop.DBus", "Features", ("s", "x")), "org.freedesktop.DBus.Properties"),
    ("BecomeMonitor", "asu", ([], 0), "org.freedesktop.DBus.Monitoring"),
    ("GetStats", "", (), "org.freedesktop.DBus.Debug.Stats"),
])  # fmt: skip
def test_other_interfaces_do_not_exist_away_from_the_canonical_path(core, call):
    member, sig, body, iface = call
    c = CoreClient(core, uid=os.getuid())
    assert _answer(c, member, sig, body, path="/", interface=iface)[0] == E + "UnknownInterface"
    assert _answer(c, member, sig, body, path="/x", interface=iface)[0] == E + "UnknownInterface"


def test_unknown_interfaces_methods_and_properties(core):
    c = CoreClient(core)
    containers = "org.freedesktop.DBus.Containers1"
    assert _answer(c, "GetConnectionInstance", "s", (c.name,), interface=containers)[0] == E + "UnknownInterface"
    assert _answer(c, "Nope", interface="org.x.Y")[0] == E + "UnknownInterface"
    assert _answer(c, "Nope")[0] == E + "UnknownMethod"
    assert _answer(c, "Nope", interface=None)[0] == E + "UnknownMethod"
    props = "org.freedesktop.DBus.Properties"
    assert _answer(c, "Set", "ssv", ("org.freedesktop.DBus", "Nope", ("s", "x")), interface=props) == (
        E + "UnknownProperty",
        'Property "org.freedesktop.DBus.Nope" not found',
    )
    assert _answer(c, "Set", "ssv", ("org.freedesktop.DBus", "Features", ("s", "x")), interface=props)[0] == (
        E + "PropertyReadOnly"
    )
    assert _answer(c, "Get", "ss", ("org.x.None", "Features"), interface=props)[0] == E + "UnknownInterface"


def test_update_activation_environment_only_at_the_canonical_path(core):
    c = CoreClient(core, uid=os.getuid())
    assert _answer(c, "UpdateActivationEnvironment", "a{ss}", ({},), path="/")[0] == E + "AccessDenied"
    assert _answer(c, "UpdateActivationEnvironment", "a{ss}", ({},)) == (None, ())


def test_eavesdrop_rules_on_a_policy_bus_are_for_root_and_the_bus_owner(core):
    """dbus-daemon 1.11.16+: AddMatch with eavesdrop='true' is refused to an unprivileged caller
    (BecomeMonitor's restriction). A bus without a policy (plain `sealbus run`) answers anyone."""
    from broker.access.config import parse_config_string
    from broker.access.mediator import BusPolicy

    from .test_policy_bypass import SYSTEM_LIKE

    core.policy = BusPolicy(parse_config_string(SYSTEM_LIKE).policy)
    user, owner = CoreClient(core), CoreClient(core, uid=os.getuid())
    rule = ("eavesdrop='true',type='signal'",)
    assert _answer(user, "AddMatch", "s", rule)[0] == E + "AccessDenied"
    assert len(core.matches) == 0 and core.eavesdroppers == {}
    assert _answer(user, "AddMatch", "s", ("type='signal'",)) == (None, ())
    assert _answer(owner, "AddMatch", "s", rule) == (None, ())
    assert list(core.eavesdroppers) == [owner.peer]
