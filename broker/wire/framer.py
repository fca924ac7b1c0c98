"""Streaming framer: bytes and fds in, complete messages with their fds out.

The framer owns its receive buffer so the I/O shell can ``recvmsg_into`` it
directly: ``recv_buffer()`` returns free space, ``commit(n, fds)`` records what
arrived. Complete messages are handed out as ``memoryview`` slices of that
buffer; when space runs out a *new* buffer is allocated (only an incomplete
tail is copied), so views already handed out stay valid and bodies are never
copied. A message whose declared sizes are invalid is rejected as soon as its
16-byte fixed header is in, before its body is buffered.

A message larger than the default buffer is read into a buffer of about its
own size (at most a sixteenth larger), starting at its head, and reading
stops at its end. A free buffer is reused from its head, whatever its size,
so a stream of large messages of one size reads each with as few reads as
the socket allows; whatever else lands in a large buffer then (small
messages, or a large one that arrived whole in one read) is small enough or
whole, and ``broker.bus.peer.settle`` copies it out if it stays queued. So
what a queue keeps alive is what it is charged for.
"""

from typing import NamedTuple

from .body_check import INCREMENTAL_MIN, BodyChecker
from .errors import HeaderError, LimitExceededError
from .message import _ENDIAN, _FIXED, DEFAULT_MAX_MESSAGE_SIZE, FIXED_HEADER_SIZE, HeaderView, WireCache, message_size

DEFAULT_BUFFER = 64 * 1024
MIN_FREE = 4096
POOL_MAX = 64

# Receive buffers of the default size not referenced by any message any more,
# shared by all framers: an idle connection holds no buffer at all.
_pool: list[bytearray] = []

# The last large receive buffer no message uses any more (at most one, of at most SPARE_MAX bytes), for the
# next large message of its exact size, of any connection (a client sending blobs of one size sends
# messages of one size): ``bytearray(n)`` zeroes its n bytes (1.5 ms per 16 MiB here, ~5% of a 16 MiB
# transit), a reused buffer needs nothing. Below glibc's largest mmap threshold (32 MiB) a freed buffer
# stays in the heap anyway, so keeping it costs no more resident memory than dropping it.
_spare: list[bytearray] = []
SPARE_MAX = 32 * 1024 * 1024


def _large_buffer(need: int) -> bytearray:
    """A buffer for one large message of ``need`` bytes: the spare if it has that size, else a new one."""
    if _spare and len(_spare[0]) == need:
        return _spare.pop()
    return bytearray(need)


class Message(NamedTuple):
    header: HeaderView
    fds: list[int]


_NO_PLANS: dict = {}  # a framer's plan table before it has a body checker: always empty, never written

_new_message = tuple.__new__  # Message(h, fds) without the generated __new__'s extra call


class Framer:
    def __init__(
        self,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_fds_per_message: int = 16,
        buffer_size: int = DEFAULT_BUFFER,
        cache: WireCache | None = None,
        body_checker: BodyChecker | None = None,
    ):
        self.max_message_size = max_message_size
        # Every body is validated before it is handed out. The checker, and this connection's header
        # caches, are made when first needed (``_checker``, ``_cache_for``): a connection that only said
        # Hello (no body; a header it never sends again) holds neither. See docs/performance.md.
        self.body_checker = body_checker
        # signature -> whole-body check, looked up here (one call less); the shared empty table until a
        # checker exists: a miss goes to ``_checker``, which compiles the plan
        self._plans = _NO_PLANS if body_checker is None else body_checker.plans
        self.max_fds_per_message = max_fds_per_message
        self._bufsize = buffer_size
        self.cache = cache  # this connection's header caches (given: shared with other framers)
        self._first = cache is None  # the next message is the connection's first: parsed without a cache
        self._buf: bytearray | None = None
        self._view: memoryview | None = None
        self._start = 0  # first byte not yet consumed
        self._end = 0  # first free byte
        self._need = 0  # size of the message at _start, once known
        self.fds: list[int] = []  # received, not yet attached to a message (a list: a deque costs ~600 bytes)
        self._claim = (b"", 0)  # (fixed header, UNIX_FDS) of the message in progress, once its fields were read
        # (header, steps, fds) of the one complete message whose large body is being validated in steps
        # (see ``next_message``); its fds are out of ``fds`` (they are not the next message's to claim).
        self.checking: tuple | None = None

    # -- input ------------------------------------------------------------

    def recv_buffer(self) -> memoryview:
        """Free space to receive into (grown for a large announced message)."""
        buf = self._buf
        if buf is not None and not self._need and len(buf) - self._end >= MIN_FREE:
            return self._view[self._end :]  # the common case: room left in the current buffer
        return self._make_room()

    def _make_room(self) -> memoryview:
        pending = self._end - self._start
        need = self._need
        want = max(need, pending + MIN_FREE)
        if self._buf is None:
            self._buf = _pool.pop() if _pool and want <= self._bufsize else bytearray(max(self._bufsize, want))
            self._view = memoryview(self._buf)
            self._start = self._end = 0
        size = len(self._buf)
        too_small = need and self._start + need > size
        # A large message still coming in is read into a buffer of about its own size, from its
        # head, so that a queued view of it keeps no more than itself alive.
        misfit = need > self._bufsize and (self._start or size > need + (need >> 4))
        short = size - self._end < MIN_FREE
        if short and not pending and not too_small and self._unused():
            self._start = self._end = 0  # every message left it: start again at its head
        elif too_small or misfit or short:
            if need > self._bufsize:
                new = _large_buffer(need)
            else:
                size = max(self._bufsize, want)
                new = _pool.pop() if _pool and size == self._bufsize else bytearray(size)
            new[:pending] = self._view[self._start : self._end]
            self._buf = new
            self._view = memoryview(new)
            self._start, self._end = 0, pending
        if need:
            # Never read past the current message when it is large: the next
            # message then starts at the head of a buffer.
            limit = self._start + need
            if limit > self._end and need > self._bufsize:
                return self._view[self._end : limit]
        return self._view[self._end :]

    def commit(self, nbytes: int, fds=()) -> None:
        self._end += nbytes
        self.fds.extend(fds)

    def push(self, data, fds=()) -> None:
        """Copy ``data`` into the buffer without parsing (e.g. bytes after SASL BEGIN)."""
        self.fds.extend(fds)
        data = memoryview(data)
        while data:
            buf = self.recv_buffer()
            n = min(len(buf), len(data))
            buf[:n] = data[:n]
            data = data[n:]
            self.commit(n)

    def feed(self, data, fds=()) -> list[Message]:
        """Convenience for tests and fuzzing: copy ``data`` in, return messages."""
        self.fds.extend(fds)
        out = []
        data = memoryview(data)
        while True:
            out.extend(self.messages())
            if not data:
                return out
            buf = self.recv_buffer()
            n = min(len(buf), len(data))
            buf[:n] = data[:n]
            data = data[n:]
            self.commit(n)

    # -- output -----------------------------------------------------------

    def next_message(self) -> Message | None:
        """The next complete message, or None; raises WireError on bad input.

        A message whose body is over INCREMENTAL_MIN bytes is validated in steps of bounded work:
        each call takes one step and returns None while ``checking`` is set, the message once its
        body is valid. Nothing after it is handed out before it (messages stay in order)."""
        if self.checking is not None:
            return self._step()
        start = self._start
        avail = self._end - start
        need = self._need
        if not need:
            if avail < FIXED_HEADER_SIZE:
                return None
            need = self._need = message_size(self._view, self.max_message_size, start)
        if avail < need:
            return None
        self._start = start + need
        self._need = 0
        cache = self.cache
        if cache is None:
            cache = self._cache_for()
        header = HeaderView(self._view[start : start + need], self.max_message_size, True, cache)
        sig = header.signature
        if sig:
            if need > INCREMENTAL_MIN:
                steps = self._checker().steps(header)
                if steps is not None:
                    return self._start_steps(header, steps)
            else:
                # before the fds are taken: on error close() returns them
                plan = self._plans.get(sig) if header.endian == "l" else None
                if plan is None:
                    self._checker().check(header)  # compiles the plan (or a big-endian body)
                else:
                    plan(header.raw, header.header_len, header.unix_fds)  # BodyChecker.check(), inlined
        n = header.unix_fds
        if not n:
            return _new_message(Message, (header, []))
        # The consumed bytes are never reused: views of them are in flight.
        return _new_message(Message, (header, self._take_fds(n)))

    def _cache_for(self) -> WireCache | None:
        """The header cache for the message about to be parsed: none for a connection's first message
        (its Hello: sent once, its fields are never seen again on this connection), then the connection's
        own, made at its second message. An idle connection thus keeps no header cache (~1.5 KiB)."""
        if self._first:
            self._first = False
            return None
        cache = self.cache = WireCache()
        return cache

    def _checker(self) -> BodyChecker:
        """This connection's body checker (and plan table), made at its first body."""
        checker = self.body_checker
        if checker is None:
            checker = self.body_checker = BodyChecker()
            self._plans = checker.plans
        return checker

    def _take_fds(self, n: int) -> list[int]:
        """The ``n`` oldest fds received (fds go to messages in the order they arrived), for a message
        that announces ``n``; raises if that is over the limit or more than arrived."""
        if n > self.max_fds_per_message:
            raise LimitExceededError(f"message carries {n} fds, limit {self.max_fds_per_message}")
        fds = self.fds
        if n > len(fds):
            raise HeaderError(f"message announces {n} fds but {len(fds)} arrived")
        taken = fds[:n]
        del fds[:n]
        return taken

    def _start_steps(self, header: HeaderView, steps) -> Message | None:
        self.checking = (header, steps, self._take_fds(header.unix_fds))
        return self._step()

    def _step(self) -> Message | None:
        """One step of the validation of the message in ``checking``: the message once it is valid."""
        header, steps, fds = self.checking
        try:
            next(steps)
        except StopIteration:
            self.checking = None
            return _new_message(Message, (header, fds))
        except BaseException:
            self._stop_checking()  # its fds go back: close() returns them
            raise
        return None

    def _stop_checking(self) -> None:
        _header, steps, fds = self.checking
        self.checking = None
        steps.close()
        self.fds[:0] = fds

    def release_idle_buffer(self) -> None:
        """Give the buffer back to the pool if it is empty and no message uses it.

        Messages still queued somewhere hold views of the buffer. Slices of
        our memoryview do not count as its exports, so the test is on the
        bytearray itself: resizing it fails while any view exists.
        """
        if self._buf is None or self._start != self._end or self.fds or not self._unused():
            return
        buf = self._buf
        self._view.release()
        if len(buf) == self._bufsize:
            if len(_pool) < POOL_MAX:
                _pool.append(buf)
        elif self._bufsize < len(buf) <= SPARE_MAX:
            _spare[:] = [buf]  # the newest: the next large message is most likely of its size
        self._buf = self._view = None
        self._start = self._end = 0

    def _unused(self) -> bool:
        """True if no message handed out still uses the buffer (then its bytes may be reused)."""
        buf = self._buf
        self._view.release()
        try:
            del buf[-1:]  # shrinking first: a large buffer is never reallocated by this test
            buf.append(0)
        except BufferError:
            return False
        finally:
            self._view = memoryview(buf)
        return True

    def check_fds(self) -> None:
        """Raise if an fd is held that no message can claim; call once ``next_message`` returned None.

        Fds go to messages in the order they arrived (as libdbus does); the
        kernel delivers them with the bytes of the sendmsg that carried them,
        so a client sending a message with fds has them claimed by the time
        the message is complete. Fds beyond what the message in progress can
        still claim (its UNIX_FDS once its header fields are in,
        ``max_fds_per_message`` before; none when no message is in progress)
        would be held by nobody: a protocol violation (libdbus cannot even
        receive more than one message's worth: MSG_CTRUNC, disconnect).
        """
        held = len(self.fds)
        if held and held > self._claimable():
            raise HeaderError(f"{held} fds arrived that no message claims")

    def _claimable(self) -> int:
        start = self._start
        avail = self._end - start
        if not avail:
            return 0
        if avail < FIXED_HEADER_SIZE:
            return self.max_fds_per_message
        view = self._view
        fixed = view[start : start + FIXED_HEADER_SIZE].tobytes()  # its serial tells it from earlier ones
        if self._claim[0] == fixed:
            return self._claim[1]
        if not self._need:
            self._need = message_size(view, self.max_message_size, start)
        fields_end = FIXED_HEADER_SIZE + _FIXED[_ENDIAN[view[start]]].unpack_from(view, start)[2]
        if avail < fields_end:
            return self.max_fds_per_message
        # parse the field array alone (the body may be far from complete); malformed fields raise now
        h = HeaderView.__new__(HeaderView)
        h.unix_fds = h.unknown_fields = h.reply_serial = 0
        h.cache = None  # a one-off parse: nothing is kept
        with view[start : start + fields_end] as raw:
            h._parse_fields(raw, _ENDIAN[view[start]], fields_end)
        claim = min(h.unix_fds, self.max_fds_per_message)  # more is refused when the message is complete
        self._claim = (fixed, claim)
        return claim

    def messages(self):
        """Every complete message, large bodies validated to the end (for tests and fuzzing)."""
        while True:
            m = self.next_message()
            if m is not None:
                yield m
            elif self.checking is None:
                return

    @property
    def buffered(self) -> int:
        return self._end - self._start

    def close(self) -> list[int]:
        """Fds never attached to a message (the caller must close them)."""
        if self.checking is not None:
            self._stop_checking()  # a message still being validated never reaches anyone
        left = list(self.fds)
        self.fds.clear()
        self._start = self._end
        self.release_idle_buffer()
        return left
