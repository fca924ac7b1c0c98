"""Real clients nobody here wrote, against a live sealbus: busctl (sd-bus), gdbus
(GDBus), dbus-send / dbus-monitor (libdbus), jeepney (blocking and trio),
dbus-fast (asyncio), and jeepney's own bundled test-suite."""

import asyncio
import os
import re
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET

import pytest
from jeepney import DBusAddress, MatchRule, MessageType, message_bus, new_method_call, new_method_return, new_signal
from jeepney.io.blocking import open_dbus_connection

from broker.client.memfd import open_payload, seal

from .conftest import LineWatcher, popen_as

IFACE = "org.sealbus.Interop"


def run(argv, **kw):
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 30)
    return subprocess.run(argv, **kw)


class Service:
    """A jeepney service in a thread: owns a name, answers Echo(s)->s and GetFd()->h."""

    def __init__(self, address, name="org.sealbus.Svc"):
        self.conn = open_dbus_connection(address, enable_fds=True)
        assert self.conn.send_and_get_reply(message_bus.RequestName(name)).body[0] == 1
        self.name = name
        self.stop = False
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while not self.stop:
            try:
                msg = self.conn.receive(timeout=0.2)
            except TimeoutError:
                continue
            except Exception:
                return
            h = msg.header
            if h.message_type != MessageType.method_call:
                continue
            member = h.fields.get(next(f for f in h.fields if f.value == 3))
            if member == "Echo":
                self.conn.send(new_method_return(msg, "s", (msg.body[0],)))
            elif member == "GetFd":
                self.conn.send(new_method_return(msg, "h", (seal(b"fd through the bus"),)))
            elif member == "Quit":
                self.conn.send(new_method_return(msg))
                self.stop = True

    def close(self):
        self.stop = True
        self.thread.join(timeout=5)
        self.conn.close()


@pytest.fixture
def service(sealbus):
    s = Service(sealbus.address)
    yield s
    s.close()


# -- busctl (sd-bus) -------------------------------------------------------------------


def test_busctl_list_call_and_introspect(sealbus, service):
    out = run(["busctl", f"--address={sealbus.address}", "list", "--no-pager"]).stdout
    assert "org.sealbus.Svc" in out and "org.freedesktop.DBus" in out
    out = run(["busctl", f"--address={sealbus.address}", "call", "org.sealbus.Svc", "/", IFACE, "Echo", "s", "hi"])
    assert out.stdout.strip() == 's "hi"', out.stderr
    out = run(["busctl", f"--address={sealbus.address}", "introspect", "--no-pager", "org.freedesktop.DBus",
               "/org/freedesktop/DBus"])  # fmt: skip
    assert "RequestName" in out.stdout and "NameOwnerChanged" in out.stdout


def test_busctl_unknown_name_errors(sealbus):
    out = run(["busctl", f"--address={sealbus.address}", "call", "org.nobody.Here", "/", IFACE, "Echo", "s", "x"])
    assert out.returncode != 0 and "org.nobody.Here" in out.stderr


# -- gdbus (GDBus) ------------------------------------------------------------------------


def test_gdbus_call_credentials_and_introspection(sealbus, service):
    out = run(["gdbus", "call", "--address", sealbus.address, "-d", "org.sealbus.Svc", "-o", "/", "-m",
               f"{IFACE}.Echo", "hello"])  # fmt: skip
    assert out.stdout.strip() == "('hello',)", out.stderr
    out = run(["gdbus", "call", "--address", sealbus.address, "-d", "org.freedesktop.DBus", "-o",
               "/org/freedesktop/DBus", "-m", "org.freedesktop.DBus.GetConnectionCredentials", "org.sealbus.Svc"])  # fmt: skip
    assert f"'ProcessID': <uint32 {os.getpid()}>" in out.stdout
    assert f"'UnixUserID': <uint32 {os.getuid()}>" in out.stdout
    assert "UnixGroupIDs" in out.stdout
    out = run(["gdbus", "introspect", "--xml", "--address", sealbus.address, "-d", "org.freedesktop.DBus", "-o",
               "/org/freedesktop/DBus"])  # fmt: skip
    root = ET.fromstring(out.stdout.split("\n", 2)[2] if out.stdout.startswith("<!DOCTYPE") else out.stdout)
    ifaces = {i.get("name") for i in root.iter("interface")}
    assert {"org.freedesktop.DBus", "org.freedesktop.DBus.Peer", "org.freedesktop.DBus.Introspectable"} <= ifaces


def test_gdbus_monitor_sees_owner_changes(sealbus):
    w = LineWatcher(subprocess.Popen(["gdbus", "monitor", "--address", sealbus.address, "-d", "org.freedesktop.DBus"],
                                     stdout=subprocess.PIPE, text=True))  # fmt: skip
    try:
        assert w.wait_for("Monitoring signals")
        poker = open_dbus_connection(sealbus.address)

        def poke():  # gdbus subscribes asynchronously: own and drop a name until it reports one
            poker.send_and_get_reply(message_bus.RequestName("org.sealbus.Ready"))
            poker.send_and_get_reply(message_bus.ReleaseName("org.sealbus.Ready"))

        assert w.wait_ready(poke, "org.sealbus.Ready")
        c = open_dbus_connection(sealbus.address)
        c.send_and_get_reply(message_bus.RequestName("org.sealbus.Temp"))
        unique = c.unique_name
        c.close()
        assert w.wait_for(f"('org.sealbus.Temp', '{unique}', '')"), w.text
        assert f"('org.sealbus.Temp', '', '{unique}')" in w.text
    finally:
        w.stop()


def test_gdbus_emit_reaches_matching_rule_only(sealbus):
    sub = open_dbus_connection(sealbus.address)
    sub.send_and_get_reply(message_bus.AddMatch(MatchRule(type="signal", interface=IFACE, member="Wanted")))
    for member, arg in (("Unwanted", "no"), ("Wanted", "yes")):
        # `gdbus emit --address` talks peer-to-peer (no Hello; any bus drops it): use --session
        out = run(["gdbus", "emit", "--session", "-o", "/g", "-s", f"{IFACE}.{member}", f"'{arg}'"],
                  env=dict(os.environ, DBUS_SESSION_BUS_ADDRESS=sealbus.address))  # fmt: skip
        assert out.returncode == 0, out.stderr
    m = sub.receive(timeout=10)
    while m.header.message_type != MessageType.signal or m.body != ("yes",):
        assert m.body != ("no",), "a signal not matching the rule was delivered"
        m = sub.receive(timeout=10)


def test_busctl_status_credentials_and_monitor(sealbus, service):
    out = run(["busctl", f"--address={sealbus.address}", "status", "--no-pager", "org.sealbus.Svc"]).stdout
    assert f"PID={os.getpid()}\n" in out and f"UID={os.getuid()}\n" in out, out
    w = LineWatcher(subprocess.Popen(["busctl", f"--address={sealbus.address}", "monitor", "--no-pager"],
                                     stdout=subprocess.PIPE, text=True))  # fmt: skip
    try:
        poker = open_dbus_connection(sealbus.address)
        assert w.wait_ready(lambda: poker.send(new_signal(DBusAddress("/p", interface=IFACE), "Poke")), "Member=Poke")
        run(["busctl", f"--address={sealbus.address}", "call", "org.sealbus.Svc", "/", IFACE, "Echo", "s", "watched"])
        assert w.wait_for('STRING "watched"') and "Member=Echo" in w.text, w.text
    finally:
        w.stop()


# -- dbus-send / dbus-monitor (libdbus) ------------------------------------------------------


def test_dbus_send_method_and_errors(sealbus, service):
    out = run(["dbus-send", f"--bus={sealbus.address}", "--print-reply", "--dest=org.sealbus.Svc", "/",
               f"{IFACE}.Echo", "string:abc"])  # fmt: skip
    assert 'string "abc"' in out.stdout, out.stderr
    out = run(["dbus-send", f"--bus={sealbus.address}", "--print-reply", "--dest=org.nobody.Here", "/",
               f"{IFACE}.Echo", "string:abc"])  # fmt: skip
    assert "org.freedesktop.DBus.Error.ServiceUnknown" in out.stderr
    out = run(["dbus-send", f"--bus={sealbus.address}", "--print-reply", "--dest=org.freedesktop.DBus",
               "/org/freedesktop/DBus", "org.freedesktop.DBus.GetNameOwner", "string:org.nobody.Here"])  # fmt: skip
    assert "org.freedesktop.DBus.Error.NameHasNoOwner" in out.stderr


def test_dbus_monitor_sees_traffic(sealbus, service):
    w = LineWatcher(subprocess.Popen(["dbus-monitor", "--address", sealbus.address], stdout=subprocess.PIPE,
                                     text=True))  # fmt: skip
    try:
        poker = open_dbus_connection(sealbus.address)
        assert w.wait_ready(lambda: poker.send(new_signal(DBusAddress("/p", interface=IFACE), "Poke")), "member=Poke")
        run(["dbus-send", f"--bus={sealbus.address}", "--type=signal", "/x", f"{IFACE}.Ping", "string:monitored"])
        run(["dbus-send", f"--bus={sealbus.address}", "--print-reply", "--dest=org.sealbus.Svc", "/",
             f"{IFACE}.Echo", "string:echoed"])  # fmt: skip
        assert w.wait_for('string "echoed"'), w.text
        seen = w.text
        assert 'string "monitored"' in seen and "member=Echo" in seen
        assert seen.index("member=Echo") < seen.index('string "echoed"')  # call before its reply
    finally:
        w.stop()


# -- jeepney, blocking ---------------------------------------------------------------------------


def test_jeepney_signal_matching(sealbus):
    sub = open_dbus_connection(sealbus.address)
    sub.send_and_get_reply(message_bus.AddMatch(MatchRule(type="signal", interface=IFACE, member="Wanted")))
    sender = open_dbus_connection(sealbus.address)
    sender.send(new_signal(DBusAddress("/s", interface=IFACE), "Unwanted", "s", ("no",)))
    sender.send(new_signal(DBusAddress("/s", interface=IFACE), "Wanted", "s", ("yes",)))
    m = sub.receive(timeout=5)
    while m.header.message_type != MessageType.signal or m.body != ("yes",):
        assert m.body != ("no",), "a signal not matching the rule was delivered"
        m = sub.receive(timeout=5)


def test_jeepney_name_owner_changed_on_disconnect(sealbus):
    watcher = open_dbus_connection(sealbus.address)
    rule = MatchRule(type="signal", sender="org.freedesktop.DBus", member="NameOwnerChanged")
    rule.add_arg_condition(0, "org.sealbus.Leaving")
    watcher.send_and_get_reply(message_bus.AddMatch(rule))
    leaver = open_dbus_connection(sealbus.address)
    leaver.send_and_get_reply(message_bus.RequestName("org.sealbus.Leaving"))
    unique = leaver.unique_name
    leaver.close()
    bodies = []
    while ("org.sealbus.Leaving", unique, "") not in bodies:
        bodies.append(watcher.receive(timeout=5).body)
    assert ("org.sealbus.Leaving", "", unique) in bodies


def test_jeepney_fd_passing(sealbus, service):
    c = open_dbus_connection(sealbus.address, enable_fds=True)
    reply = c.send_and_get_reply(new_method_call(DBusAddress("/", bus_name="org.sealbus.Svc", interface=IFACE),
                                                 "GetFd"))  # fmt: skip
    fd = reply.body[0].to_raw_fd()
    assert bytes(open_payload(fd)) == b"fd through the bus"


# -- jeepney, trio --------------------------------------------------------------------------------


async def test_jeepney_trio_call(sealbus, service):
    from jeepney.io.trio import open_dbus_router

    async with open_dbus_router(sealbus.address) as router:
        reply = await router.send_and_get_reply(
            new_method_call(DBusAddress("/", bus_name="org.sealbus.Svc", interface=IFACE), "Echo", "s", ("trio",))
        )
        assert reply.body == ("trio",)


# -- dbus-fast (asyncio) ----------------------------------------------------------------------------


def test_dbus_fast_call_and_names(sealbus, service):
    from dbus_fast import Message
    from dbus_fast import MessageType as FMT
    from dbus_fast.aio import MessageBus

    async def main():
        bus = await MessageBus(bus_address=sealbus.address).connect()
        reply = await bus.call(Message(destination="org.sealbus.Svc", path="/", interface=IFACE, member="Echo",
                                       signature="s", body=["fast"]))  # fmt: skip
        assert reply.message_type == FMT.METHOD_RETURN and reply.body == ["fast"]
        names = await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                       interface="org.freedesktop.DBus", member="ListNames"))  # fmt: skip
        assert "org.sealbus.Svc" in names.body[0]
        err = await bus.call(Message(destination="org.nobody.Here", path="/", interface=IFACE, member="Echo",
                                     signature="s", body=["x"]))  # fmt: skip
        assert err.message_type == FMT.ERROR and err.error_name == "org.freedesktop.DBus.Error.ServiceUnknown"
        bus.disconnect()

    asyncio.run(main())


# -- jeepney's own test-suite -------------------------------------------------------------------------


def test_jeepney_bundled_test_suite(sealbus, tmp_path):
    """jeepney ships tests of its I/O layers that expect a session bus: point them at sealbus."""
    env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=sealbus.address)
    out = run([sys.executable, "-m", "pytest", "-q", "-c", os.devnull, "-p", "no:cacheprovider",
               "--pyargs", "jeepney.io.tests"], cwd=tmp_path, env=env, timeout=120)  # fmt: skip
    m = re.search(r"(\d+) passed", out.stdout)
    assert out.returncode == 0 and m and int(m.group(1)) >= 20, out.stdout[-3000:]


# -- more jeepney (trio) and dbus-fast: own a name, signals, NameOwnerChanged, fds -----------------


async def test_jeepney_trio_owns_name_and_receives_matching_signal_only(sealbus):
    import trio
    from jeepney.bus_messages import message_bus as mb
    from jeepney.io.trio import open_dbus_router

    async with open_dbus_router(sealbus.address) as router:
        reply = await router.send_and_get_reply(mb.RequestName("org.sealbus.TrioOwner"))
        assert reply.body == (1,)
        rule = MatchRule(type="signal", interface=IFACE, member="Wanted")
        await router.send_and_get_reply(mb.AddMatch(rule))
        with router.filter(MatchRule(type="signal", interface=IFACE)) as queue:
            sender = open_dbus_connection(sealbus.address)
            owner = sender.send_and_get_reply(message_bus.GetNameOwner("org.sealbus.TrioOwner")).body[0]
            assert owner == router._conn.unique_name
            sender.send(new_signal(DBusAddress("/t", interface=IFACE), "Unwanted", "s", ("no",)))
            sender.send(new_signal(DBusAddress("/t", interface=IFACE), "Wanted", "s", ("yes",)))
            with trio.fail_after(10):
                got = await queue.receive()
            assert got.body == ("yes",)
            sender.close()


def test_dbus_fast_owns_name_signals_fds_and_owner_changes(sealbus, service):
    from dbus_fast import Message, RequestNameReply
    from dbus_fast import MessageType as FMT
    from dbus_fast.aio import MessageBus

    async def main():
        bus = await MessageBus(bus_address=sealbus.address, negotiate_unix_fd=True).connect()
        assert await bus.request_name("org.sealbus.FastOwner") == RequestNameReply.PRIMARY_OWNER
        got: asyncio.Queue = asyncio.Queue()

        def handler(msg):
            if msg.message_type == FMT.SIGNAL and msg.interface in (IFACE, "org.freedesktop.DBus"):
                got.put_nowait(msg)

        bus.add_message_handler(handler)
        for rule in (
            f"type='signal',interface='{IFACE}',member='Wanted'",
            "type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',arg0='org.sealbus.Gone'",
        ):
            r = await bus.call(
                Message(
                    destination="org.freedesktop.DBus",
                    path="/org/freedesktop/DBus",
                    interface="org.freedesktop.DBus",
                    member="AddMatch",
                    signature="s",
                    body=[rule],
                )
            )
            assert r.message_type == FMT.METHOD_RETURN

        def jeepney_side():
            c = open_dbus_connection(sealbus.address)
            c.send(new_signal(DBusAddress("/f", interface=IFACE), "Unwanted", "s", ("no",)))
            c.send(new_signal(DBusAddress("/f", interface=IFACE), "Wanted", "s", ("yes",)))
            c.send_and_get_reply(message_bus.RequestName("org.sealbus.Gone"))
            c.close()

        await asyncio.get_running_loop().run_in_executor(None, jeepney_side)
        m = await asyncio.wait_for(got.get(), 10)
        assert m.member == "Wanted" and m.body == ["yes"]
        owners = []
        while len(owners) < 2:
            m = await asyncio.wait_for(got.get(), 10)
            assert m.member == "NameOwnerChanged", m.member  # "Unwanted" never arrives
            owners.append(m.body)
        assert owners[0][0] == "org.sealbus.Gone" and owners[0][1] == "" and owners[1][2] == ""
        # an fd through the bus: the memfd the jeepney service returns
        reply = await bus.call(Message(destination="org.sealbus.Svc", path="/", interface=IFACE, member="GetFd"))
        assert reply.message_type == FMT.METHOD_RETURN and reply.signature == "h"
        fd = reply.unix_fds[reply.body[0]]
        assert bytes(open_payload(fd)) == b"fd through the bus"
        bus.disconnect()

    asyncio.run(main())


# -- credentials of a real process of another user ---------------------------------------------------


@pytest.mark.root
def test_credentials_of_another_users_process(sealbus, test_users):
    user = test_users[0]
    groups = [user.pw_gid, 100, 4242]
    script = ("import sys\nfrom jeepney.io.blocking import open_dbus_connection\nfrom jeepney import message_bus\n"
              f"c = open_dbus_connection({sealbus.address!r})\n"
              "c.send_and_get_reply(message_bus.RequestName('org.sealbus.Other'))\n"
              "print('owned', flush=True)\nsys.stdin.read()\n")  # fmt: skip
    p = popen_as(user, [sys.executable, "-c", script], groups=groups, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                 text=True)  # fmt: skip
    try:
        assert p.stdout.readline().strip() == "owned"
        status = {k: v.split() for k, v in (line.split(":", 1) for line in open(f"/proc/{p.pid}/status"))}
        out = run(["gdbus", "call", "--address", sealbus.address, "-d", "org.freedesktop.DBus", "-o",
                   "/org/freedesktop/DBus", "-m", "org.freedesktop.DBus.GetConnectionCredentials",
                   "org.sealbus.Other"])  # fmt: skip
        assert f"'ProcessID': <uint32 {p.pid}>" in out.stdout, out.stdout
        assert f"'UnixUserID': <uint32 {status['Uid'][0]}>" in out.stdout and int(status["Uid"][0]) == user.pw_uid
        m = re.search(r"'UnixGroupIDs': <\[(.*?)\]>", out.stdout)
        got = {int(x) for x in re.findall(r"\b\d+\b", m.group(1))}  # "uint32 5, 7"
        assert got == {int(g) for g in status["Groups"]} | {int(status["Gid"][0])} == set(groups)
        out = run(["dbus-send", f"--bus={sealbus.address}", "--print-reply", "--dest=org.freedesktop.DBus",
                   "/org/freedesktop/DBus", "org.freedesktop.DBus.GetConnectionUnixUser", "string:org.sealbus.Other"])  # fmt: skip
        assert f"uint32 {user.pw_uid}" in out.stdout
    finally:
        p.stdin.close()
        p.wait(timeout=10)
