"""Closing received fds without letting a client stall the event loop.

close() of a file on a FUSE mount waits for the FUSE server's FLUSH reply; a
client that serves its own mount can pass such a file and never answer. Block
and character devices and lingering TCP sockets can also wait on close. The
broker holds a copy of every fd it receives (forwarded or refused), so these
closes go to worker threads; memfds, pipes and unix sockets (the common case)
are closed at once, on the calling thread.
"""

import os
import queue
import threading

from .vet import close_may_block


class FdCloser:
    """``close(fd)`` from any thread; blocking kinds are closed by up to ``max_threads`` workers.

    A stuck close pins one worker; once all are stuck the rest wait in the
    queue (their fds stay open, counted by ``pending``) until a server
    answers or dies. The broker never waits.
    """

    def __init__(self, max_threads: int = 8):
        self.max_threads = max_threads
        self._queue: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self.pending = 0  # fds handed to workers and not yet closed

    def close(self, fd: int) -> None:
        if not close_may_block(fd):
            try:
                os.close(fd)
            except OSError:
                pass
            return
        with self._lock:
            self.pending += 1
            start = self._idle == 0 and self._threads < self.max_threads
            if start:
                self._threads += 1
        self._queue.put(fd)
        if start:
            threading.Thread(target=self._work, name="sealbus-fd-closer", daemon=True).start()

    def close_all(self, fds) -> None:
        for fd in fds:
            self.close(fd)

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            fd = self._queue.get()
            with self._lock:
                self._idle -= 1
            try:
                os.close(fd)
            except OSError:
                pass
            with self._lock:
                self.pending -= 1


closer = FdCloser()  # the process-wide instance the io layer uses
