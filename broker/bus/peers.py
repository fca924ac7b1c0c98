"""The peer registry: every connected peer, its unique name once it said Hello, and per-uid accounts.

Invariants: a peer is in ``all`` from connect to disconnect; it is in
``by_name`` from Hello until it disconnects or becomes a monitor; unique
names are ``:1.<n>`` numbered from ``:1.0`` in the order of Hello, as
dbus-daemon does (some clients' tests hard-code the first), and never reused; ``accounts[uid].connections`` is the
number of that uid's peers in ``all``.
"""

from .peer import Creds, Peer, UserAccount


class PeerRegistry:
    def __init__(self, fd_quota=None):
        self.fd_quota = fd_quota  # shared by every account: the fair share of the broker's fds (peer.FdQuota)
        self.all: set[Peer] = set()
        self.by_name: dict[str, Peer] = {}  # unique name -> peer
        self.accounts: dict[int, UserAccount] = {}
        self.next_id = 1
        self.next_name = 0  # the number in the next unique name

    def account(self, uid: int) -> UserAccount:
        a = self.accounts.get(uid)
        if a is None:
            a = self.accounts[uid] = UserAccount(uid, quota=self.fd_quota)
        return a

    def refusal(self, creds: Creds, limits) -> str | None:
        """Why the connection limits refuse a new connection from ``creds``, or None (root is counted
        too, as dbus-daemon counts it)."""
        if len(self.all) >= limits.max_completed_connections:
            return "The maximum number of active connections has been reached (max_completed_connections)"
        acct = self.accounts.get(creds.uid)
        if acct and acct.connections >= limits.max_connections_per_user:
            return (f"The maximum number of active connections for UID {creds.uid} has been reached "
                    "(max_connections_per_user)")  # fmt: skip
        return None

    def add(self, creds: Creds, unix_fds: bool = True) -> Peer:
        acct = self.account(creds.uid)
        acct.connections += 1
        peer = Peer(self.next_id, creds, acct, unix_fds=unix_fds)
        self.next_id += 1
        self.all.add(peer)
        return peer

    def remove(self, peer: Peer) -> None:
        self.all.discard(peer)
        peer.account.connections -= 1

    def name(self, peer: Peer) -> str:
        """Hello: give ``peer`` its unique name."""
        peer.unique_name = f":1.{self.next_name}"
        self.next_name += 1
        self.by_name[peer.unique_name] = peer
        return peer.unique_name

    def unname(self, peer: Peer) -> bool:
        """``peer`` no longer answers to its unique name (disconnect, BecomeMonitor); False if it did not."""
        return self.by_name.pop(peer.unique_name, None) is not None
