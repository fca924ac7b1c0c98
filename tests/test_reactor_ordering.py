"""The reactor serves events in the order the kernel reports them: a client's hang-up that is
already readable is processed (its names released) before a later connection's messages.

Single-instance applications rely on it: the old instance exits, the new one at once asks
for the same well-known name, and dbus-daemon has always seen the old one go first."""

import os
import socket

import trio
from jeepney.low_level import HeaderFields, Parser

from broker.bus.settings import BusSettings
from broker.io.address import listen
from broker.io.server import serve
from broker.wire import message as wm

NAME = "org.example.SingleInstance"
DO_NOT_QUEUE = 4


class RawClient:
    """A D-Bus client on a plain non-blocking socket, so that the test decides when bytes are sent."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.sock.setblocking(False)
        self.parser = Parser()
        self.serial = 0

    def auth_bytes(self) -> bytes:
        return b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\nBEGIN\r\n"

    def call_bytes(self, member: str, signature: str = "", body: tuple = ()) -> bytes:
        self.serial += 1
        return wm.build_message(wm.METHOD_CALL, self.serial, path="/org/freedesktop/DBus",
                                interface="org.freedesktop.DBus", member=member,
                                destination="org.freedesktop.DBus", signature=signature, body=body)  # fmt: skip

    async def reply(self, serial: int):
        """The reply to ``serial`` (other messages are skipped)."""
        with trio.fail_after(5):
            while True:
                msg = self.parser.get_next_message()
                if msg is None:
                    await trio.lowlevel.wait_readable(self.sock)
                    data = self.sock.recv(65536)
                    assert data, "the bus closed the connection"
                    if data.startswith(b"OK "):  # the SASL answer: the messages follow it
                        data = data[data.index(b"\r\n") + 2 :]
                    self.parser.add_data(data)
                    continue
                if msg.header.fields.get(HeaderFields.reply_serial) == serial:
                    return msg

    async def hello(self) -> None:
        self.sock.send(self.auth_bytes() + self.call_bytes("Hello"))
        await self.reply(self.serial)

    async def request_name(self) -> int:
        self.sock.send(self.call_bytes("RequestName", "su", (NAME, DO_NOT_QUEUE)))
        return (await self.reply(self.serial)).body[0]


async def test_a_hang_up_is_processed_before_a_later_connections_request(tmp_path):
    lst = listen(f"unix:path={tmp_path}/bus")
    path = str(tmp_path / "bus")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, BusSettings(), [lst])
            old, new = RawClient(path), RawClient(path)
            await old.hello()
            assert await old.request_name() == 1  # PRIMARY_OWNER
            await new.hello()
            # Without yielding to trio (so the reactor sees both in one poll, the hang-up first):
            # the old instance exits, the new one asks for the name.
            old.sock.close()
            new.sock.send(new.call_bytes("RequestName", "su", (NAME, DO_NOT_QUEUE)))
            reply = await new.reply(new.serial)
            assert reply.body[0] == 1  # PRIMARY_OWNER, not EXISTS (3): the old owner was gone first
            new.sock.close()
            nursery.cancel_scope.cancel()
    finally:
        lst.close()


async def test_a_first_message_that_is_not_hello_gets_its_error_before_the_disconnect(tmp_path):
    lst = listen(f"unix:path={tmp_path}/bus")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, BusSettings(), [lst])
            c = RawClient(str(tmp_path / "bus"))
            c.sock.send(c.auth_bytes() + c.call_bytes("ListNames"))
            reply = await c.reply(c.serial)
            assert reply.header.fields[HeaderFields.error_name] == "org.freedesktop.DBus.Error.AccessDenied"
            with trio.fail_after(5):  # then the bus closes the connection
                while True:
                    await trio.lowlevel.wait_readable(c.sock)
                    if not c.sock.recv(65536):
                        break
            c.sock.close()
            nursery.cancel_scope.cancel()
    finally:
        lst.close()
