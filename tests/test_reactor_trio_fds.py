"""The reactor hands the loop back to trio while a trio task (the accept loop,
an authentication) has input waiting, and keeps no trace of a connection
once its authentication ended, however it ended."""

import os
import socket

import trio
from jeepney import DBusAddress, new_method_call
from jeepney.io.trio import open_dbus_router

from broker.bus.settings import BusSettings
from broker.io.address import listen
from broker.io.server import serve


async def _wait_until(cond, timeout: float = 5) -> None:
    """Wait for a condition (polled), failing after timeout: no sleep that only hopes it is long enough."""
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.01)


async def _router(address, task_status=trio.TASK_STATUS_IGNORED):
    async with open_dbus_router(address) as router:
        task_status.started(router)
        await trio.sleep_forever()


async def test_no_trace_of_finished_authentications(tmp_path):
    lst = listen(f"unix:path={tmp_path}/bus")
    try:
        async with trio.open_nursery() as nursery:
            bus = await nursery.start(serve, BusSettings(), [lst])
            reactor = bus.server.reactor
            listener_fd = lst.sock.fileno()
            path = str(tmp_path / "bus")

            router = await nursery.start(_router, lst.address)  # SASL + Hello, then served by the reactor
            silent = trio.socket.socket(socket.AF_UNIX)  # connects, says nothing, leaves
            await silent.connect(path)
            wrong = trio.socket.socket(socket.AF_UNIX)  # claims another uid: rejected
            await wrong.connect(path)
            await wrong.send(b"\0AUTH EXTERNAL " + str(os.getuid() + 1).encode().hex().encode() + b"\r\n")
            half = trio.socket.socket(socket.AF_UNIX)  # half a line, then gone
            await half.connect(path)
            await half.send(b"\0AUTH EXTER")
            await _wait_until(lambda: len(reactor.trio_fds) == 4 and not reactor.trio_pending)
            assert len(reactor.trio_fds) == 4  # the listener, and the three connections still authenticating
            # their tasks took what they sent: idle, unauthenticated peers do not keep the reactor
            # from lingering (which would slow every authenticated peer down)
            assert not reactor.trio_pending
            silent.close()
            half.close()
            await wrong.send(b"BEGIN\r\n")
            wrong.close()
            await _wait_until(lambda: not bus.server.incomplete and reactor.trio_fds == {listener_fd})
            assert reactor.trio_fds == {listener_fd}
            assert not reactor.trio_pending  # nothing left for which the reactor would stop lingering

            # and the authenticated connection is the reactor's: it still works
            reply = await router.send_and_get_reply(new_method_call(
                DBusAddress("/org/freedesktop/DBus", bus_name="org.freedesktop.DBus",
                            interface="org.freedesktop.DBus"), "GetId"))  # fmt: skip
            assert reply.body[0] == bus.guid
            nursery.cancel_scope.cancel()
    finally:
        lst.close()
