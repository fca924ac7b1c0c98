"""Journal fields of the log lines a sysadmin acts on: what happened (MESSAGE_ID) and to whom.

Every denial, authentication failure, limit hit and disconnect is one log line
whose text already names the peer (unique name, uid, pid, label). A call site
also passes ``extra=about_peer(EVENT, peer)`` (or ``about(EVENT, creds)``
before Hello); the journal handler (``launch.logs``) sends these as fields, so
``journalctl MESSAGE_ID=... SEALBUS_PEER_UID=1000`` finds them without
parsing the text. Other handlers ignore them.
"""

# Stable 128-bit ids (journalctl MESSAGE_ID=...), one per kind of event; never reuse or change one.
DENIED = "2cf3df2aa08a48d4ac45650c28aa2efc"  # the policy (XML or SELinux) refused something
AUTH_FAILED = "231538a553a348a6b3128dc88e436220"  # a connection failed or timed out in SASL
LIMIT = "624aa40e23a84def8c0b8fb6d4635d71"  # a configured limit refused or disconnected a peer
DISCONNECTED = "605dcf94b19442e694d05e436640f8a4"  # a connection left (or was made to)
CONNECTED = "f4052d943003484a984972d150f264f7"  # a connection said Hello

EVENTS = {DENIED: "denied", AUTH_FAILED: "auth-failed", LIMIT: "limit", DISCONNECTED: "disconnected",
          CONNECTED: "connected"}  # fmt: skip


def about(event: str, creds, unique_name: str | None = None, **more) -> dict:
    """``extra=`` for a log call: MESSAGE_ID, SEALBUS_EVENT and the peer's uid, pid, label, unique name.

    ``more``: further fields, named without the SEALBUS_ prefix (e.g. limit="max_match_rules")."""
    f = {"MESSAGE_ID": event, "SEALBUS_EVENT": EVENTS[event], "SEALBUS_PEER_UID": str(creds.uid),
         "SEALBUS_PEER_PID": str(creds.pid or 0), "SEALBUS_PEER_LABEL": creds.label or "-"}  # fmt: skip
    if unique_name:
        f["SEALBUS_UNIQUE_NAME"] = unique_name
    f.update({f"SEALBUS_{k.upper()}": str(v) for k, v in more.items() if v is not None})
    return {"journal": f}


def about_peer(event: str, peer, **more) -> dict:
    """``about`` for a bus peer (anything with ``creds`` and ``unique_name``)."""
    return about(event, peer.creds, getattr(peer, "unique_name", None), **more)
