"""When pre-copy may end: the switchover estimate of one VM, over all its devices.

A VM's devices stop together and their rests then share one link, so what must
fit the downtime limit is the VM's rest at the VM's rate, not each device's rest
at its own.  Judged per device, a device that fits waits idle for its siblings
while its guest keeps dirtying memory, and the VM stops with more pending than
any estimate said.  Here every device keeps iterating until the VM as a whole
fits; then all converge at once.

Plain code, time passed in (the source's iteration loop is its asyncio edge).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class _Member:
    pending: int = 0
    sent: int = 0
    #: Past its initial bytes (the estimate is meaningless before).
    initial_done: bool = False
    #: Cannot iterate any further: nothing pending, or out of iterations or of room
    #: announced to the destination.
    final: bool = False
    reported: bool = False


class Convergence:
    """The devices of one VM (one device alone is a VM of one)."""

    def __init__(self, members: int, limit_ms: int) -> None:
        if members < 1:
            raise ValueError("a VM has at least one device")
        self.limit_ms = limit_ms
        self._members = [_Member() for _ in range(members)]
        self._started: float | None = None
        self._converged = False

    def start(self, now: float) -> None:
        """A device's pre-copy began: the VM's rate counts from the first one."""
        if self._started is None:
            self._started = now

    def report(self, member: int, *, pending: int, sent: int, initial_done: bool,
               final: bool) -> None:
        """``member``'s figures at the top of one iteration: bytes pending now, bytes
        it sent in pre-copy so far."""
        m = self._members[member]
        m.pending, m.sent, m.initial_done, m.final, m.reported = (
            pending, sent, initial_done, final, True)

    def done(self, member: int, rest: int = 0) -> None:
        """``member`` will not iterate (any more): it converged, or it has no pre-copy
        and ``rest`` bytes to move once stopped."""
        m = self._members[member]
        if not m.reported:
            m.pending = rest
        m.initial_done = m.final = m.reported = True

    def rate(self, now: float) -> float:
        """Bytes per second the VM's devices moved together since pre-copy began."""
        if self._started is None or now <= self._started:
            return 0.0
        return sum(m.sent for m in self._members) / (now - self._started)

    def pending(self) -> int:
        return sum(m.pending for m in self._members)

    def expected_ms(self, now: float) -> int | None:
        """The VM's downtime if it stopped now: its rest at its rate (None: no rate yet)."""
        rate = self.rate(now)
        return int(self.pending() / rate * 1000) if rate > 0 else None

    def converged(self, now: float) -> bool:
        """True once every device is past its initial bytes and the VM's rest fits the
        limit (or no device can iterate further).  It holds from then on, so every
        device reads the same answer whatever their next figures say."""
        if self._converged:
            return True
        ms = self._members
        if not all(m.reported and m.initial_done for m in ms):
            return False
        rate, pending = self.rate(now), self.pending()
        fits = rate > 0 and pending / rate * 1000 <= self.limit_ms
        self._converged = fits or pending == 0 or all(m.final for m in ms)
        return self._converged
