"""A destination host serving on loopback for in-process session tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from migd.session import Host, Incoming, Job, serve_connection


@contextlib.asynccontextmanager
async def serving(src: Host, dst: Host,
                  close_devices: bool = True) -> AsyncIterator[tuple[str, dict[str, Job]]]:
    """Yields the destination's address and its incoming jobs; shuts both hosts down."""
    jobs: dict[str, Job] = {}
    incoming: dict[bytes, Incoming] = {}
    listener = await dst.transport.listen(
        "127.0.0.1:0", lambda ch: serve_connection(dst, ch, jobs, incoming))
    try:
        yield listener.address, jobs
    finally:
        listener.close()
        for h in (src, dst):
            h.workers.shutdown()
            if close_devices:
                for d in h.devices.values():
                    d.close()
