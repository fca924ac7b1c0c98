"""What /proc says about a process, for the privilege-separation tests (host and VM tier alike)."""

from pathlib import Path


def children(pid: int) -> list[int]:
    """Pids whose parent is pid."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as {field: value}."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out
