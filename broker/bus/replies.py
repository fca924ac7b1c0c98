"""Reply tracking: which method calls still await a reply, and from whom.

A :class:`ReplySlot` is one expected reply, keyed by (caller, serial). It is
at once in the lookup (the caller's ``calls`` dict, serial -> slot: a reply
arrives addressed to the caller, so the caller's own dict is the registry,
split by caller) and in the replier's ``owed`` dict (slot -> None). Either end
frees everything it takes part in by walking only its own dict:

- the caller leaves: its slots go, silently; a reply that arrives later finds
  no slot and is dropped (and counted) by the router;
- the replier leaves: each waiting caller is handed back by direct reference,
  and the router sends it NoReply.

Nothing is ever found by scanning peers or other peers' slots.

Reply timeouts (``reply_timeout`` > 0) stay sans-IO: the core never reads a
clock. A new timed slot is *fresh* (no deadline yet) and calls ``on_armed``
(installed by the I/O shell) when the fresh set stops being empty; the shell
then calls :meth:`ReplyRegistry.expire` with its clock, which gives fresh
slots their deadline (``now`` + timeout) and frees the slots that are due.
:meth:`ReplyRegistry.next_deadline` tells the shell when to call again.
Slots with the same timeout expire in the order they were stamped, so each
timeout value keeps one insertion-ordered dict and expiry walks only due
slots from its front.
"""


class ReplySlot:
    __slots__ = ("caller", "deadline", "replier", "serial", "timeout")

    def __init__(self, caller, serial: int, replier, timeout: int):
        self.caller = caller  # the Peer that made the call and waits
        self.serial = serial  # the call's serial (the reply's REPLY_SERIAL)
        self.replier = replier  # the Peer the call went to, who owes the reply
        self.timeout = timeout  # ms; 0: never times out
        self.deadline = None  # in the shell's clock, once stamped by expire()


class ReplyRegistry:
    def __init__(self):
        self.count = 0  # slots alive on the whole bus (GetStats PendingReplies)
        self.fresh: dict[ReplySlot, None] = {}  # timed slots awaiting their deadline
        self.timed: dict[int, dict[ReplySlot, None]] = {}  # timeout ms -> stamped slots, deadline order
        self.on_armed = None  # shell hook: call expire() soon, fresh slots need a deadline

    def __len__(self) -> int:
        return self.count

    def add(self, caller, serial: int, replier, timeout: int = 0) -> ReplySlot:
        """Record that ``caller``'s call ``serial`` awaits a reply from ``replier``.

        A caller reusing the serial of a call still pending replaces it (the
        first call can no longer be told apart from the second)."""
        old = caller.calls.get(serial)
        if old is not None:
            self._free(old)
        slot = ReplySlot(caller, serial, replier, timeout if timeout > 0 else 0)
        caller.calls[serial] = slot
        caller.replies_pending += 1
        replier.owed[slot] = None
        self.count += 1
        if slot.timeout:
            armed = not self.fresh
            self.fresh[slot] = None
            if armed and self.on_armed is not None:
                self.on_armed()
        return slot

    def take(self, caller, serial: int, replier) -> bool:
        """A reply from ``replier`` to ``caller``'s call ``serial``: True (and the slot is freed)
        if that reply was expected from exactly that peer."""
        calls = caller.calls
        slot = calls.get(serial)
        if slot is None or slot.replier is not replier:
            return False
        del calls[serial], replier.owed[slot]  # _free(), inlined: once per reply
        caller.replies_pending -= 1
        self.count -= 1
        if slot.timeout:
            self._untime(slot)
        return True

    def _free(self, slot: ReplySlot) -> None:
        del slot.caller.calls[slot.serial]
        slot.caller.replies_pending -= 1
        del slot.replier.owed[slot]
        self.count -= 1
        if slot.timeout:
            self._untime(slot)

    def _untime(self, slot: ReplySlot) -> None:
        if slot.deadline is None:
            del self.fresh[slot]
            return
        group = self.timed[slot.timeout]
        del group[slot]
        if not group:
            del self.timed[slot.timeout]

    def drop_caller(self, caller) -> int:
        """``caller`` is gone: free every slot it waits on (no message is due to anybody).
        Work: the caller's own slots. Returns how many were freed."""
        slots = list(caller.calls.values())
        for slot in slots:
            self._free(slot)
        return len(slots)

    def drop_replier(self, replier) -> list[ReplySlot]:
        """``replier`` is gone: free every slot it owes, and return them (oldest first) so that
        each waiting caller is told NoReply. Work: the replier's own slots."""
        slots = list(replier.owed)
        for slot in slots:
            self._free(slot)
        return slots

    # -- timeouts (sans-IO: the shell passes its clock in) -------------------------

    def next_deadline(self) -> float | None:
        """When :meth:`expire` should next run, in the clock the shell passes to it:
        ``-inf`` if fresh slots wait for their deadline, None if nothing is timed."""
        if self.fresh:
            return float("-inf")
        best = None
        for group in self.timed.values():
            d = next(iter(group)).deadline
            if best is None or d < best:
                best = d
        return best

    def expire(self, now: float) -> list[ReplySlot]:
        """Stamp fresh slots (deadline = ``now`` + their timeout) and free the slots whose
        deadline has passed; return those (the router tells their callers NoReply).
        Work: the slots stamped plus the slots expired (one look past the due ones per timeout value)."""
        fresh = self.fresh
        if fresh:
            timed = self.timed
            for slot in fresh:
                slot.deadline = now + slot.timeout / 1000
                group = timed.get(slot.timeout)
                if group is None:
                    group = timed[slot.timeout] = {}
                group[slot] = None
            fresh.clear()
        due = []
        for group in self.timed.values():
            for slot in group:
                if slot.deadline > now:
                    break
                due.append(slot)
        for slot in due:
            self._free(slot)
        return due
