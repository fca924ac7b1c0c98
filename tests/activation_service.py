"""An activatable service for tests/test_activation.py (run by the bus from a service file's Exec=).

    activation_service.py NAME MARKER_DIR

Writes MARKER_DIR/NAME.started (its pid) as soon as it runs, connects to
$DBUS_STARTER_ADDRESS, takes NAME and answers, in the order they arrive:
``Echo(s) -> (s, u)`` (the argument and how many calls it has answered before),
``Whoami() -> (a{ss})`` (its environment, uids, gids and NoNewPrivs), ``Exit()``.
"""

import os
import sys

from jeepney import HeaderFields, MessageType, new_error, new_method_return
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection


def whoami() -> dict[str, str]:
    out = {f"env:{k}": v for k, v in os.environ.items()}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("Uid", "Gid", "Groups", "NoNewPrivs"):
                out[k] = " ".join(v.split())
    return out


def main() -> int:
    name, marker_dir = sys.argv[1], sys.argv[2]
    with open(os.path.join(marker_dir, name + ".started"), "w") as f:
        f.write(str(os.getpid()))
    conn = open_dbus_connection(os.environ["DBUS_STARTER_ADDRESS"])
    # not send_and_get_reply: queued calls are delivered before the RequestName reply (as by dbus-daemon),
    # and jeepney would drop what arrives while it waits for that reply
    conn.send(message_bus.RequestName(name))
    answered = 0
    while True:
        try:
            msg = conn.receive()
        except (ConnectionError, OSError):
            return 0
        if msg.header.message_type != MessageType.method_call:
            continue
        member = msg.header.fields.get(HeaderFields.member)
        if member == "Echo":
            conn.send(new_method_return(msg, "su", (msg.body[0], answered)))
        elif member == "Whoami":
            conn.send(new_method_return(msg, "a{ss}", (whoami(),)))
        elif member == "Exit":
            conn.send(new_method_return(msg))
            return 0
        else:
            conn.send(new_error(msg, "org.example.Error.Unknown", "s", (member or "",)))
        answered += 1


if __name__ == "__main__":
    sys.exit(main())
