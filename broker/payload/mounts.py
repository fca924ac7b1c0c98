"""Which payload filesystems are mounted, from /proc/self/mountinfo.

Read from the mount table, never by stat() of a mount point: a stat of a FUSE
mount whose server is stuck or dead would wait for it.
"""

FSTYPE = "fuse.sealbus"


def mountinfo_entries() -> list[tuple[str, str, str]]:
    """(major:minor, fstype, mount point) of every mount this process sees."""
    out = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                pre, _, post = line.partition(" - ")
                fields = pre.split(" ")
                out.append((fields[2], post.split(" ", 1)[0], fields[4].replace("\\040", " ")))
    except OSError:
        pass
    return out


def sealbus_mounts() -> dict[str, str]:
    """{mount point: major:minor} of every mounted payload fs."""
    return {mnt: dev for dev, fstype, mnt in mountinfo_entries() if fstype == FSTYPE}
