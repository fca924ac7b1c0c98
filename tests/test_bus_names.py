"""RequestName / ReleaseName semantics and the signals they cause, through the
sans-IO bus core (flags and replies exactly as the D-Bus spec states)."""

from broker.bus import names as nm

from .conftest import CoreClient, summarize

ALLOW, REPLACE, NOQUEUE = nm.ALLOW_REPLACEMENT, nm.REPLACE_EXISTING, nm.DO_NOT_QUEUE
N = "org.example.Name"


def request(c: CoreClient, flags: int, name: str = N):
    c.call("RequestName", "su", (name, flags))
    msgs = c.take()
    assert msgs[-1][0].type == 2, summarize(msgs)
    return msgs[-1][1][0], summarize(msgs[:-1])


def noc_watcher(core) -> CoreClient:
    w = CoreClient(core)
    w.call("AddMatch", "s", ("type='signal',member='NameOwnerChanged',arg0='org.example.Name'",))
    w.take()
    return w


def test_first_owner_gets_primary_and_signals_before_reply(core):
    w = noc_watcher(core)
    a = CoreClient(core)
    a.call("AddMatch", "s", ("member='NameOwnerChanged',arg0='org.example.Name'",))
    a.take()
    a.call("RequestName", "su", (N, 0))
    # dbus-daemon order: NameOwnerChanged, NameAcquired, then the method return
    assert summarize(a.take()) == [("signal", "NameOwnerChanged", (N, "", a.name)),
                                   ("signal", "NameAcquired", (N,)), ("return", None, (1,))]  # fmt: skip
    assert summarize(w.take()) == [("signal", "NameOwnerChanged", (N, "", a.name))]
    assert request(a, 0) == (nm.ALREADY_OWNER, [])


def test_queueing_and_release_passes_ownership_in_order(core):
    a, b, c = CoreClient(core), CoreClient(core), CoreClient(core)
    assert request(a, 0)[0] == nm.PRIMARY_OWNER
    assert request(b, 0) == (nm.IN_QUEUE, [])
    assert request(c, 0) == (nm.IN_QUEUE, [])
    b.call("ListQueuedOwners", "s", (N,))
    assert b.take()[0][1] == ([a.name, b.name, c.name],)
    w = noc_watcher(core)
    a.call("ReleaseName", "s", (N,))
    assert summarize(a.take()) == [("signal", "NameLost", (N,)), ("return", None, (nm.RELEASED,))]
    assert summarize(w.take()) == [("signal", "NameOwnerChanged", (N, a.name, b.name))]
    assert summarize(b.take()) == [("signal", "NameAcquired", (N,))]
    a.call("ReleaseName", "s", (N,))
    assert a.take()[0][1] == (nm.NOT_OWNER,)
    a.call("ReleaseName", "s", ("org.example.Nobody",))
    assert a.take()[0][1] == (nm.NON_EXISTENT,)


def test_do_not_queue_gets_exists(core):
    a, b = CoreClient(core), CoreClient(core)
    request(a, 0)
    assert request(b, NOQUEUE) == (nm.EXISTS, [])
    b.call("ListQueuedOwners", "s", (N,))
    assert b.take()[0][1] == ([a.name],)


def test_replace_needs_allow_replacement(core):
    a, b = CoreClient(core), CoreClient(core)
    request(a, 0)  # does not allow replacement
    assert request(b, REPLACE | NOQUEUE) == (nm.EXISTS, [])
    a.call("RequestName", "su", (N, ALLOW))  # owner changes its flags
    assert a.take()[-1][1] == (nm.ALREADY_OWNER,)
    w = noc_watcher(core)
    assert request(b, REPLACE) == (nm.PRIMARY_OWNER, [("signal", "NameAcquired", (N,))])
    assert summarize(a.take()) == [("signal", "NameLost", (N,))]
    assert summarize(w.take()) == [("signal", "NameOwnerChanged", (N, a.name, b.name))]
    # the replaced owner had not asked for DO_NOT_QUEUE: it waits in the queue
    b.call("ListQueuedOwners", "s", (N,))
    assert b.take()[0][1] == ([b.name, a.name],)


def test_replaced_owner_with_do_not_queue_leaves_the_queue(core):
    a, b = CoreClient(core), CoreClient(core)
    request(a, ALLOW | NOQUEUE)
    request(b, REPLACE)
    b.call("ListQueuedOwners", "s", (N,))
    assert b.take()[0][1] == ([b.name],)
    assert N not in a.peer.names


def test_disconnect_releases_names_and_announces(core):
    a, b = CoreClient(core), CoreClient(core)
    request(a, 0)
    request(b, 0)
    w = CoreClient(core)
    w.call("AddMatch", "s", ("member='NameOwnerChanged'",))
    w.take()
    core.disconnect(a.peer)
    assert summarize(w.take()) == [("signal", "NameOwnerChanged", (N, a.name, b.name)),
                                   ("signal", "NameOwnerChanged", (a.name, a.name, ""))]  # fmt: skip
    assert summarize(b.take()) == [("signal", "NameAcquired", (N,))]


def test_invalid_and_reserved_names_are_refused(core):
    a = CoreClient(core)
    for bad in (":1.99", "org.freedesktop.DBus", "nodots", "org..x", "1org.x"):
        a.call("RequestName", "su", (bad, 0))
        ((h, _),) = a.take()
        assert h.error_name == "org.freedesktop.DBus.Error.InvalidArgs", bad


def test_names_per_connection_limit(core):
    # the unique name counts, as in dbus-daemon: a limit of 3 leaves room for 2 well-known names
    core.limits.max_names_per_connection = 3
    a = CoreClient(core)
    request(a, 0, "org.example.A")
    request(a, 0, "org.example.B")
    a.call("RequestName", "su", ("org.example.C", 0))
    assert a.take()[0][0].error_name == "org.freedesktop.DBus.Error.LimitsExceeded"
    a.call("ReleaseName", "s", ("org.example.B",))
    a.take()
    request(a, 0, "org.example.C")  # a slot freed is usable again


def test_registry_directly_release_all_is_sorted_and_complete():
    reg = nm.NameRegistry()

    class P:
        def __init__(self):
            self.names = set()

    p, q = P(), P()
    for n in ("b.x", "a.x"):
        reg.request(n, p, 0)
        reg.request(n, q, 0)
    changes = reg.release_all(p)
    assert [(c.name, c.old, c.new) for c in changes] == [("a.x", p, q), ("b.x", p, q)]
    assert reg.names() == ["b.x", "a.x"] and not p.names
