"""What a transport must provide so the pipeline runs unchanged on top of it.

A channel moves already-sealed frames one way and, the other way, places
received bytes into buffers the *receiver* chooses (``Receiver.get_buffer``).
That receiver-chooses-the-memory contract is what an RDMA transport offers
natively (the receiver posts registered buffers; the sender writes into them),
so an RDMA-like provider implements this same interface without any change to
the pipeline.  ``send`` returns only when the given buffers may be reused.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol

from migd.errors import ConfigError


class Receiver(Protocol):
    def get_buffer(self) -> memoryview: ...
    def buffer_updated(self, n: int) -> None: ...
    def eof_received(self) -> None: ...
    def connection_lost(self, exc: BaseException | None) -> None: ...


class Channel(abc.ABC):
    peer: str = "?"
    #: Seconds senders spent waiting for the link to take more (a full socket).
    waited: float = 0.0

    @abc.abstractmethod
    async def send(self, frames: Sequence[bytes | bytearray | memoryview]) -> None:
        """Send all of ``frames`` in order; when this returns they may be reused."""

    @abc.abstractmethod
    def start(self, receiver: Receiver) -> None:
        """Begin delivering received bytes into ``receiver``'s buffers."""

    @abc.abstractmethod
    def pause_reading(self) -> None: ...

    @abc.abstractmethod
    def resume_reading(self) -> None: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Close now; pending sends fail.  Idempotent."""


class Listener(abc.ABC):
    address: str = ""

    @abc.abstractmethod
    def close(self) -> None: ...


ChannelHandler = Callable[[Channel], Coroutine[Any, Any, None]]


class Transport(abc.ABC):
    name: str = "?"

    @abc.abstractmethod
    async def connect(self, address: str, timeout: float) -> Channel: ...

    @abc.abstractmethod
    async def listen(self, address: str, handler: ChannelHandler) -> Listener: ...


class TransportRegistry:
    default = "tcp"

    def __init__(self) -> None:
        self._transports: dict[str, Callable[[], Transport]] = {}

    def register(self, name: str, factory: Callable[[], Transport]) -> None:
        self._transports[name] = factory

    def names(self) -> list[str]:
        return sorted(self._transports)

    def check(self, names: list[str]) -> list[str]:
        """``names`` as given by an operator, each known, or a clear error."""
        for n in names:
            if n not in self._transports:
                raise ConfigError(f"transport {n!r} unknown; supported: {', '.join(self.names())}")
        return names

    def create(self, name: str) -> Transport:
        try:
            return self._transports[name]()
        except KeyError:
            raise ConfigError(
                f"unknown transport {name!r}; supported: {', '.join(self.names())}"
            ) from None


REGISTRY = TransportRegistry()
