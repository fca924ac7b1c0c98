"""Timers the sans-IO bus core asks for, run by trio.

The core never reads a clock: it says when it next needs the time
(``ReplyRegistry.next_deadline``), calls a hook when a new deadline appears
(``on_armed``), and is handed trio's clock (``Bus.expire_replies``).
"""

import math

import trio


async def sleep_until_due(deadline: float | None, woken: trio.Event) -> None:
    """Wait until the core's next deadline (None: none) or until it sets ``woken`` (a new, earlier one)."""
    if deadline is None:
        deadline = math.inf
    if deadline > trio.current_time():
        with trio.move_on_at(deadline):
            await woken.wait()


async def run_reply_timer(bus, server) -> None:
    """Enforce ``reply_timeout``: callers whose reply is overdue get NoReply from the bus."""
    replies = bus.replies
    try:
        while True:
            armed = trio.Event()
            replies.on_armed = armed.set
            await sleep_until_due(replies.next_deadline(), armed)
            bus.expire_replies(trio.current_time())
            server.flush_dirty()
            server.reactor.finish_closing()
    finally:
        replies.on_armed = None
