"""The RDMA-like transport: verbs objects, the queue pair, and the ``shm`` and ``tcp`` providers."""

from . import transport as _transport  # noqa: F401  (registers "rdma+tcp" and "rdma+shm")
