"""Transports: byte movers beneath the protocol, chosen by the scheme of an address."""

from . import rdma as _rdma  # noqa: F401  (registers "rdma+tcp", alias "rdma", and "rdma+shm")
from . import tcp as _tcp  # noqa: F401  (registers "tcp")
from .base import REGISTRY, Channel, Credit, Listener, Placement, Receiver, Transport

__all__ = ["REGISTRY", "Channel", "Credit", "Listener", "Placement", "Receiver", "Transport"]
