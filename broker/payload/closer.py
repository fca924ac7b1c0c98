"""Closing received fds without letting a client stall the event loop or the other users' closes.

close() of a file on a FUSE mount waits for the FUSE server's FLUSH reply; a
client that serves its own mount can pass such a file and never answer. Block
and character devices and lingering TCP sockets can also wait on close. The
broker holds a copy of every fd it receives (forwarded or refused), so these
closes go to worker threads; memfds, pipes and unix sockets (the common case)
are closed at once, on the calling thread (see ``vet.FdClassifier``: what it
cannot prove harmless goes to a worker).

The workers are shared fairly. Queued fds wait per (filesystem, sending uid);
a worker takes the next fd round-robin over those queues, but never one of a
filesystem that already has ``per_mount_threads`` closes in progress, nor of
a uid that has ``per_uid_threads``. A FUSE server that never answers thus
pins at most one worker per mount and one uid's mounts at most
``per_uid_threads`` workers; the others keep closing everybody else's fds.
Every fd queued or being closed is charged to the uid that sent it; a uid
over ``uid_share`` is reported to the caller (the I/O shell disconnects its
sending connection and refuses its new ones until the charge drains).
"""

import os
import threading
from collections import Counter, deque

from .vet import classifier


class FdCloser:
    """``close(fd, uid)`` from any thread; kinds that may block are closed by at most ``max_threads`` workers.

    ``pending`` counts fds handed to workers and not yet closed, ``charged[uid]``
    the same per sending uid (None: the bus's own fds, never refused).
    ``classify(fd)`` returns None (close now) or a queue key (the mount);
    ``close_fn`` does the close: both are parameters for tests.
    """

    def __init__(self, max_threads: int = 8, *, per_mount_threads: int = 1, per_uid_threads: int = 2,
                 uid_share: int = 4096, classify=None, close_fn=os.close):  # fmt: skip
        self.max_threads = max_threads
        self.per_mount_threads = per_mount_threads
        self.per_uid_threads = per_uid_threads
        self.uid_share = uid_share
        self._classify = classify or classifier.close_key
        self._close_fn = close_fn
        self._cond = threading.Condition(threading.Lock())
        # (mount key, uid) -> fds no worker took yet; dict order is the round-robin order
        self._queues: dict[tuple, deque] = {}
        self._busy_mount: Counter = Counter()
        self._busy_uid: Counter = Counter()
        self.charged: Counter = Counter()
        self._threads = 0
        self._idle = 0
        self.pending = 0

    def close(self, fd: int, uid: int | None = None) -> bool:
        """Close ``fd`` (now, or queued for a worker charged to ``uid``); True if ``uid`` is over its share."""
        key = self._classify(fd)
        if key is None:
            try:
                os.close(fd)
            except OSError:
                pass
            return False
        with self._cond:
            q = self._queues.get((key, uid))
            if q is None:
                q = self._queues[(key, uid)] = deque()
            q.append(fd)
            self.pending += 1
            self.charged[uid] += 1
            over = uid is not None and self.charged[uid] > self.uid_share
            start = self._idle == 0 and self._threads < self.max_threads
            if start:
                self._threads += 1
            else:
                self._cond.notify()
        if start:
            threading.Thread(target=self._work, name="sealbus-fd-closer", daemon=True).start()
        return over

    def close_all(self, fds, uid: int | None = None) -> bool:
        over = False
        for fd in fds:
            over = self.close(fd, uid) or over
        return over

    def over_share(self, uid: int) -> bool:
        """Whether ``uid`` has more fds queued or being closed than its share (lock-free read)."""
        return self.charged.get(uid, 0) > self.uid_share

    def _take(self):
        """The next (key, uid, fd) a worker may close, round-robin; None if every queue waits (lock held)."""
        for qk, q in self._queues.items():
            key, uid = qk
            if self._busy_mount[key] < self.per_mount_threads and self._busy_uid[uid] < self.per_uid_threads:
                fd = q.popleft()
                del self._queues[qk]
                if q:
                    self._queues[qk] = q  # to the back of the round
                self._busy_mount[key] += 1
                self._busy_uid[uid] += 1
                return key, uid, fd
        return None

    def _work(self) -> None:
        cond = self._cond
        while True:
            with cond:
                job = self._take()
                while job is None:
                    self._idle += 1
                    cond.wait()
                    self._idle -= 1
                    job = self._take()
            key, uid, fd = job
            try:
                self._close_fn(fd)
            except OSError:
                pass
            with cond:
                for c, k in ((self._busy_mount, key), (self._busy_uid, uid), (self.charged, uid)):
                    c[k] -= 1
                    if not c[k]:
                        del c[k]
                self.pending -= 1
                if self._queues:
                    cond.notify()  # what this close held back may now go to another worker


closer = FdCloser()  # the process-wide instance the io layer uses
