"""The peer registry (broker/bus/peers.py) and how the Bus is put together: every attribute other
layers set is declared by ``Bus.__init__``, and the driver reaches the router through public methods only."""

import ast
import inspect

from broker.bus import driver as driver_module
from broker.bus.limits import Limits
from broker.bus.peer import Creds
from broker.bus.peers import PeerRegistry
from broker.bus.router import Bus

from .conftest import CoreClient


def test_names_are_never_reused_and_accounts_count_connections():
    reg = PeerRegistry()
    a, b = reg.add(Creds(1000)), reg.add(Creds(1000))
    assert reg.accounts[1000].connections == 2 and reg.all == {a, b}
    assert reg.name(a) == ":1.0" and reg.by_name == {":1.0": a}  # dbus-daemon's first unique name
    assert reg.unname(a) and not reg.unname(a) and reg.by_name == {}
    reg.remove(a)
    assert reg.accounts[1000].connections == 1 and reg.all == {b}
    assert reg.name(reg.add(Creds(1000))) == ":1.1"  # numbered at Hello: b, never named, took no number


def test_connection_limits():
    lim = Limits()
    lim.max_connections_per_user, lim.max_completed_connections = 2, 3
    reg = PeerRegistry()
    for _ in range(2):
        reg.add(Creds(1000))
    assert "max_connections_per_user" in reg.refusal(Creds(1000), lim)
    assert reg.refusal(Creds(0), lim) is None
    reg.add(Creds(0))
    assert reg.refusal(Creds(1002), lim).endswith("(max_completed_connections)")
    lim.max_completed_connections = 10
    reg.add(Creds(0))
    assert "max_connections_per_user" in reg.refusal(Creds(0), lim)  # root is counted too, as dbus-daemon counts it


def test_bus_declares_what_other_layers_set_on_it():
    """The I/O shell and the payload layer set these; Bus.__init__ declares every one (in its ``__dict__``, or
    as a C field of the compiled Bus: policy, limits, fd_vetter; a class attribute would not count)."""
    bus = Bus()
    for name in ("server", "spawn", "policy", "fd_vetter", "payload", "reload_hook", "catalog", "limits"):
        assert name in vars(bus) or type(vars(Bus).get(name)).__name__ == "getset_descriptor", name


def test_driver_uses_no_router_privates_and_does_not_import_it():
    tree = ast.parse(inspect.getsource(driver_module))
    imports = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert "router" not in imports

    def is_bus(node):
        return (isinstance(node, ast.Name) and node.id == "bus") or (
            isinstance(node, ast.Attribute) and node.attr == "bus"
        )

    private = sorted(
        {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and is_bus(n.value) and n.attr.startswith("_")}
    )
    assert private == []


def test_disconnect_leaves_no_trace_in_any_registry(core):
    a, b = CoreClient(core), CoreClient(core)
    a.call("RequestName", "su", ("org.x.A", 0))
    a.call("AddMatch", "s", ("type='signal',interface='org.x.I',eavesdrop='true'",))
    b.call("Do", dest=a.name, path="/", interface="org.x.I")
    a.call("Do", dest=b.name, path="/", interface="org.x.I")
    core.disconnect(a.peer)
    assert a.peer not in core.all_peers and a.name not in core.peers and core.registry.owner("org.x.A") is None
    assert len(core.matches) == 0 and core.eavesdroppers == {} and len(core.pending) == 0
    assert core.accounts[1000].connections == 1 and b.peer.calls == {} and b.peer.owed == {}
