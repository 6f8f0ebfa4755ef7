"""Decisions about the link, free of I/O and clocks: the caller passes time in.

* :class:`TokenBucket` caps wire bytes per second, like QEMU's max-bandwidth.
* :class:`AutoPolicy` decides, per window of chunks, whether compressing makes
  the migration faster.  QEMU makes the operator guess; migd measures: the
  compressor's speed per thread, the ratio the data actually compresses to, and
  how much of the window the sender spent waiting for the link (a full socket or
  an empty bucket).  Compression only helps when the link is the bottleneck:
  when the CPU is, it only adds work.
"""

from __future__ import annotations

import dataclasses


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
    seconds: float
    waiting_seconds: float  # on the link: socket full or bucket empty
    compress_cpu: float = 0.0  # thread CPU seconds spent in the compressor
    compress_in: int = 0  # bytes fed to it
    compress_out: int = 0  # bytes it produced


def _ewma(old: float | None, new: float, weight: float = 0.5) -> float:
    return new if old is None else old * (1 - weight) + new * weight


class AutoPolicy:
    #: Choose compression only when it is predicted this much faster.
    MARGIN = 1.15
    #: A window spending more than this share waiting for the link is link-bound.
    LINK_BOUND = 0.3

    def __init__(self, threads: int, explore_every: int = 16, cap: float | None = None) -> None:
        self.threads = threads
        self.explore_every = explore_every
        #: --max-bandwidth: when the operator capped the link, its capacity is known.
        self.cap = cap
        self.compress = False
        self._last_mode: bool | None = None
        self.windows = 0
        self.compressed_windows = 0
        self.raw_rate: float | None = None  # state bytes/s, uncompressed windows
        self.comp_rate: float | None = None  # state bytes/s, compressed windows
        self.link_rate: float | None = None  # wire bytes/s while link-bound
        self.codec_speed: float | None = None  # bytes/s per compressor thread
        self.ratio: float | None = None  # state bytes per wire byte when compressed
        self.link_bound = False
        self._switched = True

    def record(self, w: Window) -> bool:
        """Feed one window's measurements; returns the decision for the next window."""
        self.windows += 1
        self.compressed_windows += w.compressed
        if w.compress_cpu > 0 and w.compress_in:
            self.codec_speed = _ewma(self.codec_speed, w.compress_in / w.compress_cpu)
        if w.compress_out:
            self.ratio = _ewma(self.ratio, w.compress_in / w.compress_out)
        # The first window (start-up) and a switch's first window (buffers and tokens
        # saved up by the other mode) mislead: they are not measured, and the mode is
        # held one more window so that it is.  Measuring them let one slow start-up
        # window make compression look faster for good (seen on rdma+tcp: 60 of 64
        # windows compressed at a third of the speed), since every later raw window
        # was again a switch's first.
        steady = self._last_mode == w.compressed
        self._switched = not steady
        self._last_mode = w.compressed
        if w.seconds > 0:
            rate = w.state_bytes / w.seconds
            if steady and w.compressed:
                self.comp_rate = _ewma(self.comp_rate, rate)
            elif steady:
                self.raw_rate = _ewma(self.raw_rate, rate)
            self.link_bound = w.waiting_seconds / w.seconds > self.LINK_BOUND
            if self.link_bound:
                self.link_rate = _ewma(self.link_rate, w.wire_bytes / w.seconds)
        self.compress = self._choose()
        return self.compress

    def wants_probe(self) -> bool:
        """Whether raw windows should still compress a sample chunk now and then:
        only while what a sample measures (compressor speed, ratio) can change a
        decision.  Uncapped and CPU-bound it cannot, and the samples cost ~15 % of
        the throughput of TCP with AES (measured); a link that turns slow makes
        windows link-bound, and sampling resumes."""
        return (self.cap is not None or self.link_bound or self.codec_speed is None
                or self.ratio is None)

    def predicted_compressed(self) -> float | None:
        if self.codec_speed is None or self.ratio is None:
            return None
        cpu_limit = self.codec_speed * self.threads
        link = self.cap or self.link_rate
        return cpu_limit if link is None else min(cpu_limit, link * self.ratio)

    def _choose(self) -> bool:
        """Measurements beat predictions: once both ways have been measured, the
        faster one wins, and the other is re-measured every ``explore_every``
        windows (the link or the data may have changed)."""
        if self.ratio is not None and self.ratio < 1.1:
            return False  # this data does not compress
        if self.cap is not None:
            # A known cap: raw can never beat it, so compress whenever that promises more.
            predicted = self.predicted_compressed()
            return predicted is None or predicted > self.cap * self.MARGIN
        if self._switched:
            return self.compress  # measure this mode once before judging it
        explore = self.windows % self.explore_every == 0
        if self.compress:
            if explore or self.comp_rate is None or self.raw_rate is None:
                return not explore
            return self.comp_rate > self.raw_rate
        if not self.link_bound:
            return False  # CPU-bound: compressing could only add work
        if self.comp_rate is not None and self.raw_rate is not None:
            # Waiting on the socket may be a slow receiver, not a slow link: what
            # compression actually achieved is the answer, not what it promised.
            return explore or self.comp_rate > self.raw_rate * self.MARGIN
        predicted = self.predicted_compressed()
        if predicted is None or self.raw_rate is None:
            return True  # the link is the limit and we know nothing better: try it
        return predicted > self.raw_rate * self.MARGIN
