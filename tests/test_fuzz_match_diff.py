"""Match rules, differentially: sealbus against dbus-daemon, live, with hypothesis-generated rules.

libdbus has no match-rule parser in its public API (``bus_match_rule_parse`` lives in dbus-daemon),
so the oracle is dbus-daemon itself: the same AddMatch on both buses must be accepted or refused
alike (MatchRuleInvalid), and after it the subscriber must receive the same signals from the same
sender. Rules are drawn from keys and values (valid and invalid) that real clients send; bounded by
``max_examples``, each example a few round trips.

Known, deliberate differences (sealbus refuses what dbus-daemon takes), each matched exactly by
``deliberately_stricter``:

- an argument index with a leading zero (``arg01``): dbus-daemon reads it as ``arg1``, sealbus
  refuses the spelling (tests/test_bus_match.py::test_invalid_rules_are_rejected lists it).
"""

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jeepney import DBusAddress, HeaderFields, MessageType, message_bus, new_method_call, new_signal
from jeepney.io.blocking import open_dbus_connection

from .conftest import have, start_dbus_daemon, start_sealbus

pytestmark = pytest.mark.skipif(not have("dbus-daemon"), reason="dbus-daemon not installed")

WELL_KNOWN = "org.fuzz.Sender"
# (path, interface, member, signature, body): distinct, so each identifies itself
SIGNALS = [
    ("/org/fuzz/a", "org.fuzz.I", "Changed", "s", ("org.fuzz.I.x",)),
    ("/org/fuzz/a/b", "org.fuzz.J", "Other", "so", ("/org/fuzz/", "/org/fuzz/a")),
    ("/org/fuzzy", "org.fuzz.I", "Changed", "ss", ("org.fuzz", "b")),
    ("/", "org.fuzz.I.Sub", "Changed", "i", (5,)),
    ("/org/fuzz", "org.fuzz.J", "Changed", "as", (["x"],)),
    ("/org/fuzz/a", "org.fuzz.I", "Changed", "s", ("org.fuzz.Ix",)),
    ("/org/fuzz/a", "org.fuzz.I", "Changed", "o", ("/org/fuzz/a/b",)),
    ("/org/fuzz/b", "org.fuzz.K", "M2", "sss", ("", "/", "a")),
]
VALUES = {
    "type": ["signal", "method_call", "error", "nonsense", ""],
    "sender": [WELL_KNOWN, "$SENDER", "org.freedesktop.DBus", ":1.999", "not a name", ""],
    "interface": ["org.fuzz.I", "org.fuzz.J", "org.fuzz.I.Sub", "noDots", "org.fuzz.", ""],
    "member": ["Changed", "Other", "M2", "a.b", "1x", ""],
    "path": ["/", "/org/fuzz/a", "/org/fuzzy", "/org/fuzz/", "org", ""],
    "path_namespace": ["/", "/org/fuzz", "/org/fuzz/a", "/org/fuzz/", "/org/fuzzy", "x"],
    "destination": ["$SUBSCRIBER", ":1.999", WELL_KNOWN, "bad name", ""],
    "arg0": ["org.fuzz.I.x", "org.fuzz", "", "/org/fuzz/", "x"],
    "arg1": ["/org/fuzz/a", "b", "/"],
    "arg2": ["a", ""],
    "arg0path": ["/org/fuzz/", "/org/fuzz/a", "/", "/org/fuzz/a/b", "/org/fuzz/a/b/", "org"],
    "arg1path": ["/org/", "/org/fuzz/a", "/"],
    "arg0namespace": ["org.fuzz", "org.fuzz.I", "org", "org.fuzz.I.x", ".bad", "org.", "1org"],
    "eavesdrop": ["true", "false", "yes"],
    "arg63": ["x"],
    "arg64": ["x"],
    "arg01": ["x"],
    "argx": ["x"],
    "bogus": ["1"],
}


_ARG_KEY = re.compile(r"arg0\d+(path)?=")


def deliberately_stricter(rule: str) -> bool:
    """A rule sealbus refuses on purpose where dbus-daemon accepts it (see the module docstring)."""
    return any(_ARG_KEY.match(part) for part in rule.split(","))


@st.composite
def rules(draw) -> str:
    pairs = draw(st.lists(st.sampled_from(sorted(VALUES)), max_size=4))
    parts = []
    for key in pairs:
        value = draw(st.sampled_from(VALUES[key]))
        quoted = draw(st.booleans()) or any(c in value for c in ", ")
        parts.append(f"{key}='{value}'" if quoted else f"{key}={value}")
    return ",".join(parts)


class Side:
    """One bus with a subscriber and a sender (which owns WELL_KNOWN)."""

    def __init__(self, bus):
        self.bus = bus
        self.sub = open_dbus_connection(bus.address)
        self.snd = open_dbus_connection(bus.address)
        self.snd.send_and_get_reply(message_bus.RequestName(WELL_KNOWN))

    def call_driver(self, member: str, rule: str) -> str | None:
        """Send AddMatch/RemoveMatch; the error name, or None on success."""
        msg = new_method_call(message_bus, member, "s", (rule,))
        reply = self.sub.send_and_get_reply(msg, timeout=10)
        if reply.header.message_type == MessageType.error:
            return reply.header.fields[HeaderFields.error_name]
        return None

    def deliveries(self) -> list[tuple]:
        """Send every signal (broadcast, then one to the subscriber), then a unicast end marker; what
        the subscriber got from the sender."""
        for path, iface, member, sig, body in SIGNALS:
            self.snd.send(new_signal(DBusAddress(path, interface=iface), member, sig, body))
        direct = new_signal(DBusAddress("/org/fuzz/a", interface="org.fuzz.I"), "Direct", "s", ("d",))
        direct.header.fields[HeaderFields.destination] = self.sub.unique_name
        self.snd.send(direct)
        end = new_signal(DBusAddress("/end", interface="org.fuzz.End"), "End")
        end.header.fields[HeaderFields.destination] = self.sub.unique_name
        self.snd.send(end)
        got = []
        while True:
            m = self.sub.receive(timeout=10)
            f = m.header.fields
            if m.header.message_type != MessageType.signal or f.get(HeaderFields.sender) != self.snd.unique_name:
                continue  # the bus's own signals: not what is compared
            if f.get(HeaderFields.member) == "End":
                return got
            got.append((f[HeaderFields.path], f[HeaderFields.interface], f[HeaderFields.member], m.body))

    def concrete(self, rule: str) -> str:
        return rule.replace("$SENDER", self.snd.unique_name).replace("$SUBSCRIBER", self.sub.unique_name)

    def close(self):
        self.sub.close()
        self.snd.close()


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("matchdiff")
    buses = [start_dbus_daemon(tmp), start_sealbus(tmp)]
    out = [Side(b) for b in buses]
    yield out
    for s in out:
        s.close()
    for b in buses:
        b.stop()


def outcome(side: Side, rule: str) -> tuple:
    rule = side.concrete(rule)
    added = side.call_driver("AddMatch", rule)
    got = side.deliveries()
    removed = side.call_driver("RemoveMatch", rule) if added is None else None
    return added, sorted(map(repr, got)), removed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rules())
def test_sealbus_and_dbus_daemon_agree_on_rules_and_deliveries(sides, rule):
    dd, sb = (outcome(s, rule) for s in sides)
    if dd[0] is None and sb[0] is not None and deliberately_stricter(rule):
        return
    assert sb[0] == dd[0], f"AddMatch({rule!r}): dbus-daemon {dd[0] or 'accepts'}, sealbus {sb[0] or 'accepts'}"
    assert sb[1] == dd[1], f"rule {rule!r}: dbus-daemon delivers {dd[1]}, sealbus {sb[1]}"
    assert sb[2] == dd[2], f"RemoveMatch({rule!r}): dbus-daemon {dd[2] or 'ok'}, sealbus {sb[2] or 'ok'}"


@pytest.mark.parametrize("rule", ["", "type='signal'", "arg0namespace='org.fuzz'", "arg0path='/org/fuzz/'",
                                  "path_namespace='/org/fuzz',member='Changed'", "sender='$SENDER',arg1='b'"])  # fmt: skip
def test_known_rules_deliver_alike(sides, rule):
    dd, sb = (outcome(s, rule) for s in sides)
    assert dd[0] is None and dd[1], f"{rule!r} should be accepted and deliver something on dbus-daemon"
    assert sb == dd
