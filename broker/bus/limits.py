"""Resource limits, with dbus-daemon's names and built-in default values.

Every resource a client can make the broker hold has a limit here; the names
are the ``<limit name=...>`` names of the dbus-daemon configuration format.
"""

from dataclasses import dataclass, fields

from ..wire.message import DEFAULT_MAX_MESSAGE_SIZE

MiB = 1024 * 1024


@dataclass
class Limits:
    max_incoming_bytes: int = 127 * MiB
    max_incoming_unix_fds: int = 64
    max_outgoing_bytes: int = 127 * MiB
    max_outgoing_unix_fds: int = 64
    max_message_size: int = 32 * MiB
    max_message_unix_fds: int = 16
    service_start_timeout: int = 25000
    auth_timeout: int = 30000
    pending_fd_timeout: int = 150000
    max_completed_connections: int = 2048
    max_incomplete_connections: int = 64
    max_connections_per_user: int = 256
    max_pending_service_starts: int = 512
    max_names_per_connection: int = 512
    max_match_rules_per_connection: int = 512
    max_replies_per_connection: int = 128
    reply_timeout: int = -1
    # dbus-daemon's Containers1 limits (its defaults): accepted so that its configs load, but sealbus has
    # no org.freedesktop.DBus.Containers1 interface, so there are no containers for them to bound
    max_containers: int = 512
    max_containers_per_user: int = 16
    max_container_metadata_bytes: int = 4096
    max_connections_per_container: int = 8
    # sealbus additions: how many fds one user may have queued towards other
    # peers (this bounds the payload memfds one user can pin in others' queues)
    max_inflight_fds_per_user: int = 4096
    max_outgoing_bytes_per_user: int = 1024 * MiB

    @classmethod
    def names(cls) -> list[str]:
        """Every <limit> name accepted (each dbus-daemon 1.14 accepts, and sealbus's own)."""
        return [f.name for f in fields(cls)]

    def update(self, values: dict[str, int]) -> None:
        for k, v in values.items():
            if k not in self.names():
                raise ValueError(f"unknown limit {k!r}")
            setattr(self, k, int(v))


# Limits sealbus accepts whose resource it does not have: why each one has nothing to bound (logged when a
# config sets one, so nobody believes it is in force).
NOTHING_TO_BOUND = {
    "max_containers": "sealbus has no org.freedesktop.DBus.Containers1 interface (no containers)",
    "max_containers_per_user": "sealbus has no org.freedesktop.DBus.Containers1 interface (no containers)",
    "max_container_metadata_bytes": "sealbus has no org.freedesktop.DBus.Containers1 interface (no containers)",
    "max_connections_per_container": "sealbus has no org.freedesktop.DBus.Containers1 interface (no containers)",
}

# Limits on a queue sealbus does not have: dbus-daemon's incoming queue holds messages read but not yet
# dispatched; sealbus routes each message as soon as it is complete, so what it holds from one connection is
# its read buffer and the one message still arriving (max_message_size, max_message_unix_fds), and what it
# holds for others is charged to their outgoing queues (max_outgoing_*). Logged, like NOTHING_TO_BOUND.
HELD_OTHERWISE = {
    "max_incoming_bytes": "no incoming queue: one message in progress per connection (max_message_size)",
    "max_incoming_unix_fds": "no incoming queue: the fds of one message in progress (max_message_unix_fds)",
}


# dbus-daemon 1.8.8 cut the system bus's auth_timeout to 5 s for CVE-2014-3639 and 1.9.4 went back
# to 30 s after boot regressions (parallel boot on slow machines). Here idle sockets cost only their
# own uid its slots (the accept path evicts by uid), so the timeout only bounds how long they linger.
SYSTEM_AUTH_TIMEOUT = 10000


def limits_for(bus_type: str | None, configured: dict[str, int]) -> Limits:
    """The limits of a bus whose config sets ``configured``, the one place every path
    (``run --config``, ``run --system``, the dbus-daemon drop-in) takes them from: a
    system bus gets a short auth_timeout unless its config names one, and, as libdbus,
    no message is larger than the protocol maximum, whatever the config says."""
    lim = Limits()
    if bus_type == "system":
        lim.auth_timeout = SYSTEM_AUTH_TIMEOUT
    lim.update(configured)
    lim.max_message_size = min(lim.max_message_size, DEFAULT_MAX_MESSAGE_SIZE)
    return lim


def session_limits() -> Limits:
    """The "essentially infinite" values of dbus-daemon's session.conf."""
    lim = Limits()
    lim.max_incoming_bytes = lim.max_outgoing_bytes = 1000000000
    lim.max_message_size = 128 * MiB
    lim.max_completed_connections = 100000
    lim.max_incomplete_connections = 10000
    lim.max_connections_per_user = 100000
    lim.max_names_per_connection = 50000
    lim.max_match_rules_per_connection = 50000
    lim.max_replies_per_connection = 50000
    lim.max_outgoing_unix_fds = lim.max_incoming_unix_fds = 4096
    lim.max_inflight_fds_per_user = 65536
    lim.max_outgoing_bytes_per_user = 4000 * MiB
    return lim
