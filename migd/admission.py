"""What a daemon lets in, so that no crowd of peers or requests can exhaust it.

Two gates, both plain bookkeeping (the asyncio edge closes connections and
starts drivers):

* :class:`Gate` holds connections that have not proven their identity yet.  It
  has room for ``limit`` of them, ``per_host`` from any one address; when full,
  the *oldest* is dropped for the newcomer.  A daemon keeps two: strangers, and
  connections whose first frame (a well-formed HELLO, usually waiting already
  when the connection is accepted) named an authorized key.  A flood of strangers, or one
  host trickling bytes, drops its own connections, never a peer's that is
  proving its key; authenticated connections count in neither.

* :class:`Admission` bounds migrations: at most ``max_migrations`` VFs migrate
  out at once and as many in, and together they reserve no more than
  ``budget`` bytes of stream buffers (each migration reserves its worst case up
  front, so memory stays bounded whatever the number of requests).  Outgoing
  requests beyond that wait in order (status ``queued``, with their position),
  up to ``max_queued``; beyond that they are refused.  Incoming migrations are
  refused at once with ``busy``: the source's operator decides when to retry.
  A VM's VFs are admitted together or not at all, since they switch over
  together (half a VM admitted would wait forever for the other half).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Hashable
from typing import Generic, TypeVar

from .errors import Busy, ConfigError
from .units import human_bytes

K = TypeVar("K", bound=Hashable)


class Gate(Generic[K]):
    def __init__(self, limit: int, per_host: int) -> None:
        self.limit = limit
        self.per_host = per_host
        self._all: collections.OrderedDict[K, str] = collections.OrderedDict()
        self._hosts: dict[str, collections.OrderedDict[K, None]] = {}

    def __len__(self) -> int:
        return len(self._all)

    def enter(self, key: K, host: str) -> list[K]:
        """Take in ``key`` from ``host``; returns the keys dropped to make room
        (their connections are to be closed)."""
        dropped: list[K] = []
        mine = self._hosts.get(host)
        if mine is not None and len(mine) >= self.per_host:
            dropped.append(next(iter(mine)))
        elif len(self._all) >= self.limit:
            dropped.append(next(iter(self._all)))
        for k in dropped:
            self.leave(k)
        self._all[key] = host
        self._hosts.setdefault(host, collections.OrderedDict())[key] = None
        return dropped

    def leave(self, key: K) -> None:
        """``key`` authenticated, failed or closed; no-op if it is not here."""
        host = self._all.pop(key, None)
        if host is None:
            return
        mine = self._hosts[host]
        del mine[key]
        if not mine:
            del self._hosts[host]


class Ticket:
    """Leave for ``devices`` VFs (one, or a VM's) to migrate, each with up to
    ``per_device`` bytes of stream buffers."""

    def __init__(self, admission: Admission, devices: int, per_device: int,
                 outgoing: bool) -> None:
        self._admission = admission
        self.devices = devices
        self.per_device = per_device
        self.outgoing = outgoing
        #: Devices of the ticket still migrating (each leaves once, when it ends).
        self.holding = 0
        self.admitted = asyncio.Event()

    @property
    def nbytes(self) -> int:
        return self.devices * self.per_device

    @property
    def position(self) -> int:
        """1 for the next in the queue; 0 once admitted (or withdrawn)."""
        return self._admission.position(self)

    async def wait(self) -> None:
        await self.admitted.wait()

    def leave(self) -> None:
        """One of the ticket's devices ended (or gave up waiting)."""
        self._admission.leave(self)


class Admission:
    def __init__(self, max_migrations: int, max_queued: int, budget: int) -> None:
        self.max_migrations = max_migrations
        self.max_queued = max_queued
        self.budget = budget
        #: VFs migrating, by direction (True: out).
        self.running = {True: 0, False: 0}
        self.reserved = 0
        self._queue: collections.deque[Ticket] = collections.deque()

    def _fits(self, t: Ticket) -> bool:
        return (self.running[t.outgoing] + t.devices <= self.max_migrations
                and self.reserved + t.nbytes <= self.budget)

    def _check_possible(self, devices: int, nbytes: int) -> None:
        if devices > self.max_migrations:
            raise ConfigError(f"a VM of {devices} devices needs more than max_migrations "
                              f"({self.max_migrations}) VFs migrating at once")
        if nbytes > self.budget:
            raise ConfigError(f"the migration needs {human_bytes(nbytes)} of stream buffers, more "
                              f"than the buffer budget ({human_bytes(self.budget)}); use a "
                              "smaller chunk size or fewer channels")

    def _admit(self, t: Ticket) -> None:
        self.running[t.outgoing] += t.devices
        self.reserved += t.nbytes
        t.holding = t.devices
        t.admitted.set()

    def outgoing(self, devices: int, per_device: int) -> Ticket:
        """A ticket for an outgoing migration: admitted now, or queued behind the
        others.  Busy when the queue is full."""
        t = Ticket(self, devices, per_device, outgoing=True)
        self._check_possible(devices, t.nbytes)
        if not self._queue and self._fits(t):
            self._admit(t)
        elif len(self._queue) >= self.max_queued:
            raise Busy(f"{self.running[True]} migration(s) running and {len(self._queue)} "
                       f"queued (max_migrations {self.max_migrations}, max_queued "
                       f"{self.max_queued}): try again later")
        else:
            self._queue.append(t)
        return t

    def incoming(self, nbytes: int) -> Ticket:
        """A ticket for an incoming VF, admitted now, or Busy."""
        t = Ticket(self, 1, nbytes, outgoing=False)
        self._check_possible(1, nbytes)
        if not self._fits(t):
            raise Busy(f"this host is receiving {self.running[False]} migration(s) (max_migrations "
                       f"{self.max_migrations}, buffers {human_bytes(self.reserved)} of "
                       f"{human_bytes(self.budget)} reserved): try again later")
        self._admit(t)
        return t

    @property
    def queued(self) -> int:
        return len(self._queue)

    def position(self, t: Ticket) -> int:
        try:
            return self._queue.index(t) + 1
        except ValueError:
            return 0

    def leave(self, t: Ticket) -> None:
        if not t.admitted.is_set():  # gave up waiting: one device fewer to admit
            t.devices -= 1
            if t.devices <= 0 and t in self._queue:
                self._queue.remove(t)
        elif t.holding > 0:
            t.holding -= 1
            self.running[t.outgoing] -= 1
            self.reserved -= t.per_device
        self._pump()

    def _pump(self) -> None:
        """Admit from the head of the queue, in order (a large VM is not starved by
        small migrations slipping past it)."""
        while self._queue and self._fits(self._queue[0]):
            self._admit(self._queue.popleft())


class LogThrottle:
    """At most ``burst`` messages per ``window`` seconds, then one line saying how
    many were left out: a flood of strangers must not flood the journal too."""

    def __init__(self, burst: int = 10, window: float = 10.0) -> None:
        self.burst = burst
        self.window = window
        self._start = float("-inf")
        self._said = 0
        self.skipped = 0

    def allow(self, now: float) -> tuple[bool, int]:
        """Whether to log now, and how many were left out since the last window."""
        skipped = 0
        if now - self._start >= self.window:
            skipped, self.skipped = self.skipped, 0
            self._start, self._said = now, 0
        if self._said < self.burst:
            self._said += 1
            return True, skipped
        self.skipped += 1
        return False, skipped
