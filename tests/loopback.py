"""A destination host serving on loopback for in-process session tests."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator

import transports
from migd.crypto import ciphers_for
from migd.destination import serve_connection
from migd.session import Host, Job


@contextlib.asynccontextmanager
async def serving(src: Host, dst: Host, close_devices: bool = True, transport: str = "tcp"
                  ) -> AsyncIterator[tuple[str, dict[str, Job]]]:
    """Yields the destination's address (naming ``transport``) and its incoming jobs;
    shuts both hosts down."""
    t = transports.REGISTRY.create(transport)
    wd = tempfile.TemporaryDirectory(prefix="migd-loop-")
    where = f"{wd.name}/rdma.sock" if transport.endswith("shm") else "127.0.0.1:0"
    listener = await t.listen(where, lambda ch: serve_connection(dst, ch, ciphers_for(t.leaves_host)[1]))
    try:
        yield transports.REGISTRY.url(t.name, listener.address), dst.jobs
    finally:
        listener.close()
        wd.cleanup()
        for h in (src, dst):
            h.workers.shutdown()
            if close_devices:
                for d in h.devices.values():
                    d.close()
