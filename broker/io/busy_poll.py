"""Adaptive busy polling: how long the reactor polls before it sleeps.

Why: a request/reply hop through the broker costs two sleeps and two
wake-ups, and on a virtual machine waking a halted vCPU costs more than the
broker's routing. When the next message comes soon after the last pass,
polling for it (non-blocking epoll, yielding the CPU to any runnable task in
between) is cheaper than sleeping. When traffic is sparse, polling would only
burn CPU, so the window adapts the way KVM's halt polling does: it grows when
the wait that followed a pass was shorter than the maximum (a poll would have
caught it) and shrinks when it was longer. On an idle or lightly used bus the
window is zero and the reactor simply sleeps.

Sans-IO: the reactor reports what happened; this decides the next window.
"""

GROW_START = 0.00001  # seconds: the first window after a wait a poll would have caught
GROW_FACTOR = 2
SHRINK_FACTOR = 2
MIN_WINDOW = 0.000005  # below this the window is zero


class PollWindow:
    __slots__ = ("max", "window")

    def __init__(self, max_seconds: float):
        self.max = max(0.0, max_seconds)
        self.window = 0.0

    def waited(self, seconds: float) -> None:
        """The reactor waited ``seconds`` after a pass before the next event (polling and sleeping)."""
        if not self.max:
            return
        if seconds <= self.max:
            if seconds > self.window:  # a longer poll would have caught it
                self.window = min(self.max, max(GROW_START, self.window * GROW_FACTOR))
        else:
            self.window /= SHRINK_FACTOR
            if self.window < MIN_WINDOW:
                self.window = 0.0
