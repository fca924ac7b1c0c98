"""Match rules: strict parsing (MatchRuleInvalid) and matching semantics."""

import pytest

from broker.bus.match import MatchRuleInvalid, parse_match_rule
from broker.wire.message import HeaderView, build_message

from .conftest import CoreClient


def sig(path="/a/b", interface="org.x.I", member="M", signature="", body=(), sender=":1.7", destination=None):
    raw = build_message(4, 1, path=path, interface=interface, member=member, signature=signature, body=body,
                        sender=sender, destination=destination)  # fmt: skip
    return HeaderView(memoryview(raw))


def matches(text, h, owners=None):
    rule = parse_match_rule(text)
    if not rule.matches_header(h, (owners or {}).get, h.sender):
        return False
    if rule.needs_body:
        return rule.matches_args(h.unmarshal_body() if h.signature else (), h.signature)
    return True


@pytest.mark.parametrize("text", [
    "type='nonsense'", "type=signal,type=signal", "member='a.b'", "interface='noDots'", "path='/trailing/'",
    "path='/a',path_namespace='/a'", "arg64='x'", "arg01='x'", "argX='x'", "arg0='x',arg0path='/x'",
    "eavesdrop='yes'", "bogus='1'", "sender='not a name'", "member='unterminated", "member", "type='signal',",
    "x" * 1025, "destination=''", "arg0namespace='.bad'",
])  # fmt: skip
def test_invalid_rules_are_rejected(text):
    with pytest.raises(MatchRuleInvalid):
        parse_match_rule(text)


@pytest.mark.parametrize("text", [
    "", "type='signal'", "type=signal,member=M", "sender='org.freedesktop.DBus',interface='org.freedesktop.DBus'",
    "path_namespace='/'", "arg0='with,comma'", "arg0='it'\\''s'", "arg63='x'", "arg3path='/a/'",
    "arg0namespace='org.x'", "eavesdrop=true", "destination=':1.5'",
])  # fmt: skip
def test_valid_rules_parse(text):
    parse_match_rule(text)


def test_quoting_follows_dbus_daemon():
    assert parse_match_rule("arg0='with,comma'").args == {0: "with,comma"}
    assert parse_match_rule("arg0='it'\\''s'").args == {0: "it's"}
    assert parse_match_rule("arg0=a\\'b").args == {0: "a'b"}


def test_header_keys():
    h = sig()
    assert matches("type='signal',interface='org.x.I',member='M',path='/a/b'", h)
    assert not matches("type='method_call'", h)
    assert not matches("member='N'", h)
    assert matches("path_namespace='/a'", h) and matches("path_namespace='/'", h)
    assert not matches("path_namespace='/a/b/c'", h) and not matches("path_namespace='/a/bb'", sig(path="/a/b"))
    assert not matches("path_namespace='/a/b'", sig(path="/a/bc"))
    assert matches("sender=':1.7'", h) and not matches("sender=':1.8'", h)
    assert matches("sender='org.x.Owner'", h, {"org.x.Owner": ":1.7"})
    assert not matches("sender='org.x.Owner'", h, {"org.x.Owner": ":1.9"})
    assert matches("destination=':1.3'", sig(destination=":1.3")) and not matches("destination=':1.3'", h)


def test_arg_keys():
    h = sig(signature="sso", body=("org.x.Foo.Bar", "/a/b/", "/a/b/c"))
    assert matches("arg0='org.x.Foo.Bar'", h) and not matches("arg0='org.x'", h)
    assert matches("arg0namespace='org.x.Foo'", h) and matches("arg0namespace='org.x.Foo.Bar'", h)
    assert not matches("arg0namespace='org.x.Fo'", h)
    assert matches("arg1path='/a/b/'", h) and matches("arg1path='/a/'", h)
    assert matches("arg1path='/a/b/c/d'", h)  # the argument is a namespace prefix of the rule
    assert matches("arg2path='/a/'", h) and not matches("arg2path='/a/b/c/d'", h)
    assert not matches("arg3='x'", h)  # no such argument
    assert not matches("arg2='/a/b/c'", h)  # argN matches strings only, not object paths
    assert not matches("arg0='1'", sig(signature="u", body=(1,)))


def test_sender_rule_uses_the_real_sender_not_the_claimed_one(core):
    """A client cannot make its signal match ``sender='org.freedesktop.DBus'`` rules
    by writing that into its own SENDER field."""
    sub = CoreClient(core)
    sub.call("AddMatch", "s", ("type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged'",))
    sub.take()
    liar = CoreClient(core)
    sub.take()
    liar.send(4, path="/org/freedesktop/DBus", interface="org.freedesktop.DBus", member="NameOwnerChanged",
              signature="sss", body=("org.x.Fake", "", ":1.1"), sender="org.freedesktop.DBus")  # fmt: skip
    assert sub.take() == []
    honest = CoreClient(core)
    sub.take()
    sub.call("AddMatch", "s", (f"type='signal',sender='{honest.name}'",))
    sub.take()
    honest.signal("org.x.I", "Hi")
    ((h, _),) = sub.take()
    assert h.member == "Hi" and h.sender == honest.name
