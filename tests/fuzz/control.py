"""Target ``control``: the launcher <-> broker control channel, read by ``Inbox`` over a real socketpair.

The launcher (root, CAP_AUDIT_WRITE) reads what the broker (sandboxed, facing every client) sends:
a compromised broker must not be able to crash or wedge it with malformed messages.
Input: the bytes the peer writes before it closes the channel.
Invariants:
- ``Inbox.read`` raises only EOFError, and hands out only JSON objects (dicts), each at most once;
- the launcher's filter on what it audits (``USER_AVC_FORM``) takes any text of a message.
"""

import socket

from broker.access.selinux import USER_AVC_FORM
from broker.io.control import Inbox


def TestOneInput(data: bytes) -> None:
    a, b = socket.socketpair()
    try:
        a.sendall(data)
        a.close()
        b.setblocking(False)
        inbox = Inbox(b)
        msgs = []
        for _ in range(4):
            try:
                msgs += inbox.read()
            except EOFError:
                break
        else:
            raise AssertionError("the channel never reported its end")
        for msg in msgs:
            assert type(msg) is dict, f"non-object message {msg!r:.80}"
            USER_AVC_FORM.fullmatch(str(msg.get("text", "")))
    finally:
        a.close()
        b.close()
