"""memfd and seal constants (Python 3.11 lacks the newer ones; the kernel has them)."""

import fcntl
import os

F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
F_SEAL_SEAL = 0x0001
F_SEAL_SHRINK = 0x0002
F_SEAL_GROW = 0x0004
F_SEAL_WRITE = 0x0008
F_SEAL_FUTURE_WRITE = 0x0010
F_SEAL_EXEC = 0x0020

# What kdbus required and what sealbus's `sealed` fd mode requires. F_SEAL_WRITE,
# not F_SEAL_FUTURE_WRITE: the latter does not stop a writable mapping made before it.
PAYLOAD_SEALS = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL

MFD_CLOEXEC = getattr(os, "MFD_CLOEXEC", 1)
MFD_ALLOW_SEALING = getattr(os, "MFD_ALLOW_SEALING", 2)
MFD_NOEXEC_SEAL = 0x0008

SEAL_NAMES = {
    F_SEAL_SEAL: "SEAL", F_SEAL_SHRINK: "SHRINK", F_SEAL_GROW: "GROW", F_SEAL_WRITE: "WRITE",
    F_SEAL_FUTURE_WRITE: "FUTURE_WRITE", F_SEAL_EXEC: "EXEC",
}  # fmt: skip


def seal_names(seals: int) -> str:
    return "|".join(n for bit, n in SEAL_NAMES.items() if seals & bit) or "none"


def get_seals(fd: int) -> int | None:
    """The fd's seals, or None if it is not a sealable file (F_GET_SEALS never reaches FUSE)."""
    try:
        return fcntl.fcntl(fd, F_GET_SEALS)
    except OSError:
        return None
