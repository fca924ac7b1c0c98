"""Differential tests: the same client script against sealbus and dbus-daemon
must see the same messages in the same order (the spec leaves the order of
Hello reply / NameAcquired / NameOwnerChanged / NameLost open; real clients
depend on dbus-daemon's)."""

import pytest

from .conftest import RawClient, describe_msg

N = "org.sealbus.Order"
NOC_RULE = f"type='signal',member='NameOwnerChanged',arg0='{N}'"


def _count(members, need):
    seen = []

    def pred(m):
        seen.append(describe_msg(m)[1])
        return all(seen.count(x) >= 1 for x in need)

    return pred


def script(bus) -> dict:
    out = {}
    a = RawClient(bus)
    assert a.authenticate().startswith(b"OK ")
    names = {}
    hello = a.hello()
    names[a.unique_name] = "A"
    out["hello"] = [describe_msg(m, names) for m in hello]
    a.reply_to(a.call("AddMatch", "s", (NOC_RULE,)))
    out["A acquires"] = [describe_msg(m, names) for m in a.reply_to(a.call("RequestName", "su", (N, 1)))]
    b = RawClient(bus)
    b.authenticate()
    b.hello()
    names[b.unique_name] = "B"
    b.reply_to(b.call("AddMatch", "s", (NOC_RULE,)))
    out["B replaces: B"] = [describe_msg(m, names) for m in b.reply_to(b.call("RequestName", "su", (N, 2)))]
    out["B replaces: A"] = [describe_msg(m, names) for m in a.until(_count(None, ["NameLost", "NameOwnerChanged"]))]
    out["B releases: B"] = [describe_msg(m, names) for m in b.reply_to(b.call("ReleaseName", "s", (N,)))]
    out["B releases: A"] = [describe_msg(m, names) for m in a.until(_count(None, ["NameAcquired", "NameOwnerChanged"]))]
    q = a.reply_to(a.call("ListQueuedOwners", "s", (N,)))
    out["queue"] = [describe_msg(m, names) for m in q]
    errs = []
    for dest, flags in (("org.nobody.Here", 0), ("org.nobody.Here", 2), (":1.9999", 0), (":1.9999", 2)):
        errs += a.reply_to(a.call("Do", dest=dest, path="/", interface="org.x.I", flags=flags))
    for member in ("GetNameOwner", "GetConnectionUnixUser", "GetConnectionUnixProcessID", "ListQueuedOwners"):
        errs += a.reply_to(a.call(member, "s", ("org.nobody.Here",)))
    errs += a.reply_to(a.call("AddMatch", "s", ("type='nonsense'",)))
    errs += a.reply_to(a.call("RemoveMatch", "s", ("type='signal'",)))
    errs += a.reply_to(a.call("RequestName", "su", (":1.5", 0)))
    errs += a.reply_to(a.call("NoSuchMethod"))
    out["errors"] = [describe_msg(m, names) for m in errs]
    a.close()
    b.close()
    return out


@pytest.mark.timeout(60)
def test_same_messages_in_same_order_as_dbus_daemon(sealbus, dbus_daemon):
    ours = script(sealbus)
    theirs = script(dbus_daemon)
    for step in theirs:
        assert ours[step] == theirs[step], step


def test_hello_reply_precedes_name_acquired(sealbus):
    c = RawClient(sealbus)
    c.authenticate()
    kinds = [describe_msg(m)[:2] for m in c.hello()]
    assert kinds == [("method_return", None), ("signal", "NameAcquired")]
