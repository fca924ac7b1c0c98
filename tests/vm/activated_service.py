"""The system-bus VM tier's activatable service and its confined caller (jeepney, blocking).

    activated_service.py serve NAME   own NAME and answer every method call with who runs it
    activated_service.py call NAME    call NAME's Who; print the answer (exit 0) or the error (exit 2)

Installed twice by tests/vm/systembus_tier.py: as the service the launcher starts from a plain
Exec=/User= service file (labelled sealbus_vmtest_svc_exec_t: it runs in sealbus_vmtest_svc_t) and
as the stranger (sealbus_vmtest_stranger_exec_t: connects, may send nothing)."""

import os
import sys

from jeepney import DBusAddress, HeaderFields, MatchRule, MessageType, new_method_call, new_method_return
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection

INTERFACE = "org.sealbus.VmTest"


def whoami() -> str:
    with open("/proc/self/attr/current") as f:
        context = f.read().strip("\0\n")
    return f"uid={os.getuid()} gid={os.getgid()} pid={os.getpid()} context={context}"


def serve(name: str) -> int:
    conn = open_dbus_connection(bus="SYSTEM", auth_timeout=60)
    # the call that activated us is delivered as soon as we own the name, maybe before RequestName's reply:
    # keep method calls from the start (jeepney drops what no filter takes while it waits for a reply)
    with conn.filter(MatchRule(type="method_call"), bufsize=64) as calls:
        reply = conn.send_and_get_reply(message_bus.RequestName(name), timeout=30)
        if reply.body != (1,):
            print(f"RequestName({name}) answered {reply.body}", file=sys.stderr)
            return 1
        while True:
            msg = conn.recv_until_filtered(calls)
            conn.send(new_method_return(msg, "s", (whoami(),)))


def call(name: str) -> int:
    conn = open_dbus_connection(bus="SYSTEM", auth_timeout=60)
    reply = conn.send_and_get_reply(new_method_call(DBusAddress("/", bus_name=name, interface=INTERFACE), "Who"),
                                    timeout=60)  # fmt: skip
    if reply.header.message_type == MessageType.error:
        print(f"error {reply.header.fields.get(HeaderFields.error_name)}: {reply.body}")
        return 2
    print(reply.body[0])
    return 0


if __name__ == "__main__":
    action, bus_name = sys.argv[1], sys.argv[2]
    sys.exit(serve(bus_name) if action == "serve" else call(bus_name))
