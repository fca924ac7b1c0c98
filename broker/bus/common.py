"""What every bus module shares: the bus's own name and path, and the error it answers with.

Kept apart from the router so that the driver and the registries need not import it
(the router builds them; nothing below it imports the router).
"""

DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
E = "org.freedesktop.DBus.Error."


class BusError(Exception):
    """A D-Bus error reply the bus sends back to the caller."""

    def __init__(self, name: str, text: str):
        super().__init__(text)
        self.name = name if "." in name else E + name
        self.text = text
