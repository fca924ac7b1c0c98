"""The match registry (broker/bus/matches.py): O(1) removal per rule, an index whose
lookups never miss a matching rule, and costs that do not grow with other users' rules."""

import random

import pytest

from broker.bus.limits import session_limits
from broker.bus.match import parse_match_rule
from broker.bus.matches import MatchRegistry
from broker.bus.peer import Creds, Peer, UserAccount
from broker.bus.router import Bus, _LazyBody
from broker.wire.message import HeaderView, build_message

from .conftest import CoreClient
from .worktrace import needs_python_lines, work

E = "org.freedesktop.DBus.Error."


def _peer(i):
    return Peer(i, Creds(1000), UserAccount(1000))


def _sig(path="/a", interface="org.x.I", member="M", sender=":1.7", destination=None, t=4, signature="", body=()):
    raw = build_message(t, 1, path=path, interface=interface, member=member, sender=sender,
                        destination=destination, signature=signature, body=body)  # fmt: skip
    return HeaderView(memoryview(raw))


def _candidates(reg, h, sender, eavesdrop_only=False):
    return {r for b in reg.buckets(h, sender, _LazyBody(h), eavesdrop_only) for r in b}


def test_rules_are_keyed_on_their_most_selective_exact_field():
    reg, p = MatchRegistry(), _peer(1)
    texts = ["member='M',interface='org.x.I'", "path='/a',interface='org.x.I'", "interface='org.x.I'",
             "sender=':1.7'", "sender='org.freedesktop.DBus'", "sender='org.x.Name'", "type='signal'",
             "path_namespace='/a'", "arg0='x'"]  # fmt: skip
    rules = [parse_match_rule(t) for t in texts]
    for r in rules:
        reg.add(p, r)
    ix = reg.index
    assert set(ix.by_member) == {"M"} and set(ix.by_path) == {"/a"} and set(ix.by_interface) == {"org.x.I"}
    assert set(ix.by_sender) == {":1.7", "org.freedesktop.DBus"} and set(ix.by_arg0) == {"x"}
    assert list(ix.wild) == rules[5:8]
    assert len(reg) == len(ix) == 9 and list(p.matches) == rules
    assert reg.remove_all(p) == 9
    assert len(reg) == len(ix) == 0 and ix.keyed_other == 0
    assert not (ix.by_member or ix.by_path or ix.by_interface or ix.by_sender or ix.by_arg0)
    assert p.matches == {} and p.match_keys == {}


def test_remove_match_takes_one_duplicate_and_tracks_eavesdroppers():
    reg, p = MatchRegistry(), _peer(1)
    for _ in range(2):
        reg.add(p, parse_match_rule("interface='org.x.I',eavesdrop='true'"))
    reg.add(p, parse_match_rule("member='M'"))
    assert reg.eavesdroppers == {p: 2}
    assert reg.remove(p, parse_match_rule("eavesdrop=true,interface=org.x.I"))  # same rule, other spelling
    assert reg.eavesdroppers == {p: 1} and len(reg) == 2
    assert reg.remove(p, parse_match_rule("interface='org.x.I',eavesdrop='true'"))
    assert reg.eavesdroppers == {} and not reg.remove(p, parse_match_rule("interface='org.x.I',eavesdrop='true'"))
    assert len(reg) == 1 and reg.eaves.by_interface == {}


def test_index_lookup_never_misses_a_matching_rule():
    """Soundness of the index against brute force: every rule that matches a header is in
    one of the buckets looked up for it (random rules x random headers)."""
    rnd = random.Random(5)
    vals = {"type": ["signal", "method_call"], "interface": ["org.x.I", "org.x.J"], "member": ["M", "N"],
            "path": ["/a", "/a/b"], "path_namespace": ["/a", "/"], "sender": [":1.7", ":1.8", "org.x.Name",
            "org.freedesktop.DBus"], "destination": [":1.3"], "eavesdrop": ["true", "false"], "arg0": ["a", "b"],
            "arg1": ["a"]}  # fmt: skip
    reg, rules = MatchRegistry(), []
    owners = {"org.x.Name": ":1.7", "org.freedesktop.DBus": "org.freedesktop.DBus"}
    for i in range(400):
        keys = rnd.sample(sorted(vals), rnd.randint(0, 4))
        if "path" in keys and "path_namespace" in keys:
            keys.remove("path")
        rule = parse_match_rule(",".join(f"{k}='{rnd.choice(vals[k])}'" for k in keys))
        reg.add(_peer(i), rule)
        rules.append(rule)
    hits = 0
    for _ in range(300):
        sender = rnd.choice([":1.7", ":1.8", "org.freedesktop.DBus"])
        signature, body = rnd.choice([("", ()), ("s", ("a",)), ("ss", ("b", "a")), ("u", (1,)), ("as", (["a"],))])
        h = _sig(path=rnd.choice(["/a", "/a/b", "/c"]), interface=rnd.choice(["org.x.I", "org.x.J", "org.x.K"]),
                 member=rnd.choice(["M", "N", "O"]), sender=sender, destination=rnd.choice([None, ":1.3"]),
                 t=rnd.choice([1, 4]), signature=signature, body=body)  # fmt: skip
        for eavesdrop_only in (False, True):
            want = {r for r in rules if r.matches_header(h, owners.get, sender)
                    and (not r.needs_body or r.matches_args(body, signature))
                    and (r.eavesdrop or not eavesdrop_only)}  # fmt: skip
            assert want <= _candidates(reg, h, sender, eavesdrop_only)
            hits += len(want)
    assert hits > 1000  # the draw exercised the index


# -- costs, counted in executed lines (never time) ---------------------------------------------------


def _bus_with_bystander_rules(n_peers, rules_each, rule="type='signal',arg0='x{i}'"):
    bus = Bus(session_limits())
    for p in range(n_peers):
        c = CoreClient(bus)
        for i in range(rules_each):
            c.call("AddMatch", "s", (rule.format(i=i, p=p),))
        c.take()
    return bus


@needs_python_lines
def test_disconnect_with_many_rules_costs_its_own_rules():
    """Regression (hardening class 5): each rule was removed by scanning its bucket, and rules
    without a member shared one global bucket, so a peer leaving with N rules cost N x the
    rules of everybody else."""
    costs = {}
    for bystanders, n in ((0, 200), (50, 200), (0, 400)):
        bus = _bus_with_bystander_rules(bystanders, 100, "type='signal',interface='org.b{p}.I{i}'")
        leaver = CoreClient(bus)
        for i in range(n):
            leaver.call("AddMatch", "s", (f"type='signal',arg0='y{i}'",))
        costs[bystanders, n] = work(lambda: bus.disconnect(leaver.peer))  # noqa: B023
        assert sum(len(p.matches) for p in bus.all_peers) == bystanders * 100
    assert costs[50, 200] <= costs[0, 200] * 1.1, costs  # not the others' 5000 rules
    assert costs[0, 400] <= costs[0, 200] * 2.2, costs  # its own


@needs_python_lines
def test_remove_match_costs_the_same_whatever_the_rules_around_it():
    """Regression: RemoveMatch scanned the peer's own rules and the bucket of all peers' rules."""
    costs = {}
    for crowd in (0, 300):
        bus = _bus_with_bystander_rules(crowd // 100, 100, "type='signal',interface='org.b{p}.I{i}'")
        c = CoreClient(bus)
        for i in range(crowd):
            c.call("AddMatch", "s", (f"type='signal',arg0='z{i}'",))
        c.call("AddMatch", "s", ("type='signal',arg0='target'",))
        c.take()
        costs[crowd] = work(lambda: c.call("RemoveMatch", "s", ("type='signal',arg0='target'",)))  # noqa: B023
        assert c.take()[0][0].error_name is None
    assert costs[300] <= costs[0] * 1.1, costs


@pytest.mark.parametrize("others", ["type='signal',interface='org.other.I{p}x{i}'", "type='signal',arg0='o{p}x{i}'"])
@needs_python_lines
def test_a_signal_does_not_pay_for_other_users_unrelated_rules(others):
    """Regression: rules without a member all sat in one global bucket that every signal walked
    (interface-only rules, or rules that name no header field but a string arg0)."""
    costs = {}
    for bystanders in (2, 20):  # 100 or 1000 unrelated rules (the index itself costs a constant)
        bus = _bus_with_bystander_rules(bystanders, 50, others)
        a, b = CoreClient(bus), CoreClient(bus)
        b.call("AddMatch", "s", ("type='signal',interface='org.x.I'",))
        b.take()
        costs[bystanders] = work(lambda: a.signal("org.x.I", "S", "s", ("mine",), path="/p"))  # noqa: B023
        assert [h.member for h, _ in b.take()] == ["S"]
    assert costs[20] <= costs[2] * 1.1, costs


def test_remove_match_removes_exactly_one_duplicate(core):
    """dbus-daemon semantics: the same rule added twice is delivered once and needs two RemoveMatch."""
    a, b = CoreClient(core), CoreClient(core)
    for _ in range(2):
        b.call("AddMatch", "s", ("type='signal',interface='org.x.I'",))
    b.take()
    a.signal("org.x.I", "One")
    assert [h.member for h, _ in b.take()] == ["One"]
    b.call("RemoveMatch", "s", ("interface='org.x.I',type='signal'",))
    a.signal("org.x.I", "Two")
    assert [h.member or h.error_name for h, _ in b.take()] == [None, "Two"]
    b.call("RemoveMatch", "s", ("type='signal',interface='org.x.I'",))
    a.signal("org.x.I", "Three")
    b.call("RemoveMatch", "s", ("type='signal',interface='org.x.I'",))
    assert [h.error_name for h, _ in b.take()] == [None, E + "MatchRuleNotFound"]


def test_killed_peer_mid_broadcast_leaves_the_others_served(core):
    """Without an I/O shell a kill disconnects at once, while a bucket is being walked."""
    core.limits.max_outgoing_bytes = 2048
    a, stuck, ok = CoreClient(core), CoreClient(core), CoreClient(core)
    for c in (stuck, ok):
        c.call("AddMatch", "s", ("type='signal',interface='org.x.Flood'",))
        c.take()
    for _ in range(6):
        a.signal("org.x.Flood", "F", "s", ("y" * 500,))
        ok.take()
    assert stuck.peer.closed or stuck.peer.dying
    assert not ok.peer.dying and sum(len(p.matches) for p in core.all_peers) == 1
