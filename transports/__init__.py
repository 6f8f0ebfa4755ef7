"""Transports: byte movers beneath the protocol, chosen by name."""

from . import tcp as _tcp  # noqa: F401  (registers "tcp")
from .base import REGISTRY, Channel, Listener, Receiver, Transport

__all__ = ["REGISTRY", "Channel", "Listener", "Receiver", "Transport"]
