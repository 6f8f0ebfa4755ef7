"""Decisions about the link, free of I/O and clocks: the caller passes time in.

* :class:`TokenBucket` caps wire bytes per second, like QEMU's max-bandwidth.
* :class:`AutoPolicy` decides, per window of chunks, whether compressing makes
  the migration faster.  QEMU makes the operator guess; migd measures what each
  mode actually *delivers*: state bytes per second as the destination
  acknowledges them loaded.  The sender's own view (how long it waited for a
  full socket) misleads on a link the kernel shapes, because socket buffers
  absorb the bursts; acknowledgements do not.  The compressor's speed per
  thread and the ratio the data compresses to say whether trying compression
  could pay at all, so a fast link never pays for finding out.
"""

from __future__ import annotations

import dataclasses
import heapq


class TokenBucket:
    """``rate`` bytes per second with a burst of ``burst`` bytes."""

    def __init__(self, rate: float, now: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(rate / 20, 1 << 20)
        self._tokens = self.burst
        self._stamp = now

    def delay(self, nbytes: int, now: float) -> float:
        """Take ``nbytes``; returns how long to wait before sending them (0: now)."""
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= nbytes
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


@dataclasses.dataclass
class Window:
    """What one window of chunks measured."""

    compressed: bool
    state_bytes: int
    wire_bytes: int
    #: From when the window's first chunk could start being delivered (the previous
    #: window acknowledged, or its first chunk sent, whichever is later) to the
    #: acknowledgement of its last chunk: the time the destination took to get it.
    seconds: float


def _ewma(old: float | None, new: float, weight: float = 0.5) -> float:
    return new if old is None else old * (1 - weight) + new * weight


class AutoPolicy:
    """Raw or compressed, window by window, by what each delivered.

    It starts raw.  Compression is tried when the compressor could beat what raw
    delivers (its speed on the threads it has, from sample chunks); then the two
    measured rates decide, and the losing mode is tried again now and then, less
    often each time it loses again (``explore_every`` windows, doubling up to
    ``MAX_GAP``): a link or data that changes is noticed, and a mode that keeps
    losing costs a few windows per migration, not one in every sixteen."""

    #: Switch only for a mode this much faster (measurements are noisy).
    MARGIN = 1.1
    #: The longest gap between tries of the losing mode, in windows.
    MAX_GAP = 256

    def __init__(self, threads: int, explore_every: int = 32, cap: float | None = None) -> None:
        self.threads = threads
        self.explore_every = explore_every
        #: --max-bandwidth: when the operator capped the link, its capacity is known.
        self.cap = cap
        self.compress = False
        self.windows = 0
        self.compressed_windows = 0
        self.raw_rate: float | None = None  # state bytes/s delivered, uncompressed windows
        self.comp_rate: float | None = None  # state bytes/s delivered, compressed windows
        self.codec_speed: float | None = None  # bytes/s per compressor thread
        self.ratio: float | None = None  # state bytes per wire byte when compressed
        self._last: bool | None = None
        self._gap = explore_every
        self._next_try = explore_every
        self._trying = False
        self._raw_windows = 0

    def sampled(self, cpu: float, n_in: int, n_out: int) -> None:
        """What the compressor did since last asked: ``cpu`` thread seconds to turn
        ``n_in`` bytes into ``n_out`` (sample chunks, or compressed windows)."""
        if cpu > 0 and n_in:
            self.codec_speed = _ewma(self.codec_speed, n_in / cpu)
        if n_out:
            self.ratio = _ewma(self.ratio, n_in / n_out)

    def record(self, w: Window) -> bool:
        """Feed one delivered window's measurements; returns the decision for the
        next window."""
        self.windows += 1
        self.compressed_windows += w.compressed
        # A mode's first window after the other's starts its rate afresh: the old
        # figure may be from another phase of the link.  (The caller leaves the
        # start-up out of the first window.)
        if w.seconds > 0:
            rate = w.state_bytes / w.seconds
            weight = 0.5 if self._last == w.compressed else 1.0
            if w.compressed:
                self.comp_rate = _ewma(self.comp_rate, rate, weight)
            else:
                self.raw_rate = _ewma(self.raw_rate, rate, weight)
                self._raw_windows += 1
        self._last = w.compressed
        self.compress = self._choose(w.compressed)
        return self.compress

    def cpu_limit(self) -> float | None:
        """State bytes/s the compressor could take on all its threads (an upper bound:
        the machine's other work shares the CPU)."""
        return None if self.codec_speed is None else self.codec_speed * self.threads

    def wants_probe(self) -> bool:
        """Whether raw windows should compress a sample chunk now and then: only while
        what a sample measures (compressor speed, ratio) could change a decision."""
        if self.cap is not None or self.codec_speed is None or self.ratio is None:
            return True
        if self.comp_rate is not None or self.raw_rate is None:
            return self.raw_rate is None  # tried for real: tries keep it measured
        limit = self.cpu_limit()
        # Near the point where trying compression would start: keep the figures fresh.
        return limit is not None and limit > self.raw_rate * self.MARGIN * 0.8

    def predicted_compressed(self) -> float | None:
        limit = self.cpu_limit()
        if limit is None or self.ratio is None:
            return None
        return limit if self.cap is None else min(limit, self.cap * self.ratio)

    def _choose(self, was: bool) -> bool:
        if self.ratio is not None and self.ratio < 1.1:
            return False  # this data does not compress
        if self.cap is not None:
            return self.under_cap()
        if self.raw_rate is None:
            return False  # nothing measured yet: raw first
        if self._trying:
            # The other mode had its window: keep the better, and wait longer before
            # trying again if the try lost.
            self._trying = False
            winner = self._better(not was)  # back, unless the try won by the margin
            self._gap = self.explore_every if winner == was else min(self._gap * 2, self.MAX_GAP)
            self._next_try = self.windows + self._gap
            return winner
        if self.comp_rate is None:
            # Never tried: only if the compressor could beat what raw delivers (raw
            # measured over two windows: one can be a slow start).
            limit = self.cpu_limit()
            if self._raw_windows < 2 or limit is None or limit <= self.raw_rate * self.MARGIN:
                return False
            return self._try()
        best = self._better(was)
        if best != was:
            self._gap = self.explore_every
            self._next_try = self.windows + self._gap
            return best
        if self.windows >= self._next_try and (was or self._close()):
            return self._try()
        return was

    def under_cap(self) -> bool:
        """Under a known cap raw can never beat it: compress whenever that promises
        more, or while nothing says otherwise yet.  Needs no delivered window, so the
        sender asks at each window's start."""
        if self.ratio is not None and self.ratio < 1.1:
            return False
        predicted = self.predicted_compressed()
        return predicted is None or predicted > self.cap * self.MARGIN  # type: ignore[operator]

    def _close(self) -> bool:
        """Raw is ahead: is compression close enough that it might win now?  A try
        costs most where compression is far behind (a fast link: one compressed
        window there takes as long as eight raw ones), and raw's own windows show
        when the link slows down, so far behind it is not tried again."""
        assert self.raw_rate is not None and self.comp_rate is not None
        return self.comp_rate * self.MARGIN > self.raw_rate

    def _better(self, current: bool) -> bool:
        """The faster mode by measurement; the current one unless the other wins by
        ``MARGIN``."""
        raw, comp = self.raw_rate, self.comp_rate
        if raw is None or comp is None:
            return current
        if current:
            return not raw > comp * self.MARGIN
        return comp > raw * self.MARGIN

    def _try(self) -> bool:
        """Give the other mode one window."""
        self._trying = True
        return not self.compress


class FairQueue:
    """One link rate shared by several flows (migrations): start-time fair queuing
    over one token bucket.

    Each waiting send gets a start tag, the later of the queue's virtual time and
    where its flow's previous send ended (in bytes); sends go in start-tag order,
    each once the bucket has room.  So flows that keep the link busy get equal
    bytes per second whatever their frame sizes, a flow alone gets the whole rate,
    and a flow that was idle comes back at the current virtual time, with no
    credit saved up (a sender has one send waiting at a time, then the next).
    The caller passes time in and sleeps for the delays it is given."""

    def __init__(self, rate: float, now: float) -> None:
        self.bucket = TokenBucket(rate, now)
        self._vtime = 0.0
        self._finish: dict[object, float] = {}
        self._heap: list[tuple[float, int, object, int, object]] = []
        self._seq = 0

    @property
    def rate(self) -> float:
        return self.bucket.rate

    def push(self, flow: object, nbytes: int, ticket: object) -> None:
        """Flow ``flow`` wants to send ``nbytes``; ``ticket`` comes back from
        :meth:`pop` when it may."""
        start = max(self._vtime, self._finish.get(flow, 0.0))
        self._finish[flow] = start + nbytes
        self._seq += 1
        heapq.heappush(self._heap, (start, self._seq, flow, nbytes, ticket))

    def pop(self, now: float) -> tuple[object, float] | None:
        """The next ticket to serve and how long to wait before it may go (it is
        charged now); None when nobody waits."""
        if not self._heap:
            return None
        start, _, _, nbytes, ticket = heapq.heappop(self._heap)
        self._vtime = start
        return ticket, self.bucket.delay(nbytes, now)

    def forget(self, flow: object) -> list[object]:
        """``flow`` stopped: its waiting tickets, which will not be served."""
        self._finish.pop(flow, None)
        gone = [e[4] for e in self._heap if e[2] is flow]
        if gone:
            self._heap = [e for e in self._heap if e[2] is not flow]
            heapq.heapify(self._heap)
        return gone
