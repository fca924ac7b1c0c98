"""reply_timeout end to end: a real `sealbus run --config F` answers NoReply for a service that never does."""

import time

from jeepney import DBusAddress, new_method_call
from jeepney.io.blocking import open_dbus_connection
from jeepney.low_level import MessageType


def test_reply_timeout_in_the_config_gives_no_reply(sealbus_factory, tmp_path):
    conf = tmp_path / "timeout.conf"
    conf.write_text("""<busconfig><type>session</type><policy context="default">
      <allow send_destination="*"/><allow receive_sender="*"/><allow own="*"/></policy>
      <limit name="reply_timeout">300</limit></busconfig>""")
    bus = sealbus_factory("--config", str(conf))
    svc = open_dbus_connection(bus.address)  # never answers
    caller = open_dbus_connection(bus.address)
    t = time.monotonic()
    reply = caller.send_and_get_reply(new_method_call(DBusAddress("/", bus_name=svc.unique_name,
                                                                  interface="org.x.I"), "Never"), timeout=10)  # fmt: skip
    waited = time.monotonic() - t
    assert reply.header.message_type == MessageType.error
    assert reply.header.fields[4] == "org.freedesktop.DBus.Error.NoReply"  # ERROR_NAME
    assert 0.3 <= waited < 5, waited
    svc.close()
    caller.close()
