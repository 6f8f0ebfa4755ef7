"""The host's link, shared: ``max_bandwidth_total`` divided among running migrations.

The policy (start-time fair queuing over a token bucket) is :class:`migd.pacing.FairQueue`,
free of clocks; this is its asyncio edge.  One task grants waiting sends in the
queue's order, each once the bucket has room for it, so that migrations waiting
at the same time share the rate evenly and one running alone gets all of it."""

from __future__ import annotations

import asyncio
import contextlib

from ..pacing import FairQueue


class SharedLink:
    """A host-wide cap on wire bytes per second, shared fairly."""

    def __init__(self, rate: float) -> None:
        self._loop = asyncio.get_running_loop()
        self.queue = FairQueue(rate, self._loop.time())
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def rate(self) -> float:
        return self.queue.rate

    @rate.setter
    def rate(self, rate: float) -> None:
        """A reload's new cap, from the next grant on."""
        self.queue.bucket.rate = rate

    async def take(self, flow: object, nbytes: int) -> None:
        """Wait until ``flow`` may send ``nbytes`` more."""
        fut: asyncio.Future[None] = self._loop.create_future()
        self.queue.push(flow, nbytes, fut)
        if self._task is None or self._task.done():
            self._task = self._loop.create_task(self._grant())
        self._wake.set()
        await fut

    def leave(self, flow: object) -> None:
        """``flow`` is done: what it still waits for is dropped."""
        for fut in self.queue.forget(flow):
            assert isinstance(fut, asyncio.Future)
            fut.cancel()

    async def _grant(self) -> None:
        while True:
            item = self.queue.pop(self._loop.time())
            if item is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            fut, delay = item
            assert isinstance(fut, asyncio.Future)
            if delay > 0:
                await asyncio.sleep(delay)
            if not fut.done():
                fut.set_result(None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
