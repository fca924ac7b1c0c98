"""Directory change notification (inotify, through libc with ctypes: the standard library has none).

One non-blocking inotify fd watches a set of directories; the owner polls
its fd (trio's ``wait_readable`` in the broker, ``select`` in the launcher),
then ``drain()``s it. Events are not interpreted one by one: any change
means "reload", so a flood of events costs one bounded read per wake-up and
the kernel's own queue bound (``max_queued_events``; an overflow is just one
more reason to reload). Directories that do not exist are not watched, as in
dbus-daemon (a directory created later is seen at the next reload).
"""

import ctypes
import errno
import logging
import os

log = logging.getLogger("sealbus.inotify")

IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
# what makes a directory's service files or config files different
CHANGE_MASK = IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF
MAX_WATCHES = 4096  # a config naming more directories than this has the rest unwatched (and logged)
READ_SIZE = 65536
MAX_READS = 64  # per drain: a writer that never stops cannot keep the reader here

_libc = None


def _lib():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)  # the process's own libc: no library search (no ldconfig run)
        _libc.inotify_init1.argtypes = [ctypes.c_int]
        _libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        _libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    return _libc


class DirWatcher:
    """Watches a set of directories for changes; ``fileno()`` is readable when one changed."""

    def __init__(self):
        fd = _lib().inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"inotify_init1: {os.strerror(e)}")
        self.fd = fd
        self.watches: dict[str, int] = {}  # path -> watch descriptor

    def fileno(self) -> int:
        return self.fd

    def set_paths(self, paths) -> None:
        """Watch exactly ``paths`` (those that exist): new ones are added, dropped ones removed."""
        wanted = list(dict.fromkeys(os.path.abspath(p) for p in paths))
        if len(wanted) > MAX_WATCHES:
            log.warning("%d directories to watch; only the first %d are", len(wanted), MAX_WATCHES)
            wanted = wanted[:MAX_WATCHES]
        for path in set(self.watches) - set(wanted):
            _lib().inotify_rm_watch(self.fd, self.watches.pop(path))
        for path in wanted:
            wd = _lib().inotify_add_watch(self.fd, os.fsencode(path), CHANGE_MASK | IN_ONLYDIR)
            if wd >= 0:
                self.watches[path] = wd
                continue
            self.watches.pop(path, None)
            e = ctypes.get_errno()
            if e not in (errno.ENOENT, errno.ENOTDIR):
                log.info("not watching %s: %s", path, os.strerror(e))

    def drain(self) -> bool:
        """Read pending events (without blocking, at most MAX_READS buffers); True if there was any."""
        seen = False
        for _ in range(MAX_READS):
            try:
                if not os.read(self.fd, READ_SIZE):
                    break
            except BlockingIOError:
                break
            seen = True
        return seen

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.watches.clear()
