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
import asyncio
import dataclasses
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol

from migd.errors import ConfigError, TransportError


class Receiver(Protocol):
    def get_buffer(self) -> memoryview: ...
    def buffer_updated(self, n: int) -> None: ...
    def eof_received(self) -> None: ...
    def connection_lost(self, exc: BaseException | None) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Credit:
    """The receiver's leave to write one payload of up to ``length`` bytes at
    ``offset`` of its region ``rkey``.  Credits are granted, used and checked in
    order (``seq``), one payload each."""

    seq: int
    rkey: int
    offset: int
    length: int


class Placement(abc.ABC):
    """One-sided placement of DATA payloads into memory the receiver registered.

    The receiver registers its payload buffers and posts each free one as a
    credit; the sender waits for a credit, fills it (in place when the
    receiver's memory is mapped here, else from a local buffer) and writes it;
    the frame header follows on the byte stream and the receiver takes the
    landed buffer for it.  Channels without it carry payloads in the stream."""

    #: The receiver's buffers are mapped here: the sender fills them in place, and
    #: moving a byte costs a memory copy, not link time.
    maps_remote: bool = False

    # --- receiver side
    @abc.abstractmethod
    def register(self, size: int, count: int) -> list[memoryview]:
        """``count`` buffers of ``size`` bytes that the peer may be given credits for."""

    @abc.abstractmethod
    def post(self, buf: memoryview) -> None:
        """Grant the peer a credit for ``buf`` (one of :meth:`register`'s)."""

    @abc.abstractmethod
    def landed(self, length: int) -> memoryview:
        """The buffer the next write landed in (the object :meth:`post` was given);
        an error if nothing of ``length`` bytes landed."""

    # --- sender side
    @abc.abstractmethod
    async def credit(self) -> Credit:
        """The next credit, waiting until the receiver posts one."""

    @abc.abstractmethod
    def unused(self, credit: Credit) -> None:
        """Give back a credit that was taken but not written: it is the next one again."""

    @abc.abstractmethod
    def view(self, credit: Credit) -> memoryview | None:
        """The credited bytes themselves when they are mapped here (fill in place), or None."""

    @abc.abstractmethod
    def write(self, credit: Credit, data: memoryview | None, length: int
              ) -> asyncio.Future[None]:
        """Post a write of ``data`` (None: ``length`` bytes already filled in place)
        into ``credit``; done when ``data`` may be reused.  Writes and the stream's
        sends leave in the order they are posted."""


class Channel(abc.ABC):
    peer: str = "?"
    #: This end's IP address on an IP transport ("" otherwise): how the peer reaches
    #: this host when it listens on a wildcard address.
    local: str = ""
    #: The registry name of the transport it runs on.
    transport: str = "?"
    #: Seconds senders spent waiting for the link to take more (a full socket).
    waited: float = 0.0
    #: One-sided payload placement (RDMA-like transports); None: payloads are stream bytes.
    placement: Placement | None = None
    #: Seconds a send may wait for the peer to take more (a full socket, no credit)
    #: before the channel fails: a peer that stops reading must not hold a stopped
    #: source device forever.  None: no limit.
    stall_timeout: float | None = None

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

    @property
    def alive(self) -> bool:
        """Still reachable and accepting: a daemon whose listener is gone is deaf
        (its watchdog stops, so that systemd restarts it)."""
        return True

    @abc.abstractmethod
    def close(self) -> None: ...


ChannelHandler = Callable[[Channel], Coroutine[Any, Any, None]]


class Transport(abc.ABC):
    name: str = "?"
    #: Whether the bytes cross a network (False: both ends on this host, behind a
    #: root-only socket).  Which ciphers that allows is the daemon's policy
    #: (``migd.crypto.ciphers_for``), not the transport's.
    leaves_host: bool = True

    @abc.abstractmethod
    async def connect(self, address: str, timeout: float) -> Channel: ...

    @abc.abstractmethod
    async def listen(self, address: str, handler: ChannelHandler) -> Listener: ...


def stalled(channel: Channel, what: str) -> TransportError:
    return TransportError(f"{channel.peer} {what} for {channel.stall_timeout:g}s")


async def wait_stalled(fut: asyncio.Future[None], timeout: float | None,
                       error: Callable[[], BaseException]) -> None:
    """Await ``fut``; past ``timeout`` seconds it fails with ``error()``.

    Not ``asyncio.wait_for``: on 3.11 a cancel that lands as its timeout fires is
    turned into TimeoutError and lost, and a writer that outlives its migration
    then holds the device busy for good."""
    handle = None
    if timeout is not None:
        def expire() -> None:
            if not fut.done():
                fut.set_exception(error())
        handle = asyncio.get_running_loop().call_later(timeout, expire)
    try:
        await fut
    finally:
        if handle is not None:
            handle.cancel()


class TransportRegistry:
    """Transports by the scheme that names them in an address: ``tcp://H:P``,
    ``rdma+tcp://H:P``, ``rdma+shm:///run/migd/rdma.sock``; a bare ``H:P`` uses
    the daemon's default transport."""

    default = "tcp"

    def __init__(self) -> None:
        self._transports: dict[str, Callable[[], Transport]] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, factory: Callable[[], Transport], *aliases: str) -> None:
        self._transports[name] = factory
        for a in aliases:
            self._aliases[a] = name

    def canonical(self, name: str) -> str:
        return self._aliases.get(name, name)

    def split(self, address: str, default: str | None = None) -> tuple[str, str]:
        """(transport name, transport-specific address) of ``address``."""
        scheme, sep, rest = address.partition("://")
        if not sep:
            return self.check([default or self.default])[0], address
        name = self.canonical(scheme)
        self.check([name])
        if not rest:
            raise ConfigError(f"address {address!r}: nothing after {scheme}://")
        return name, rest

    def url(self, name: str, address: str) -> str:
        return f"{name}://{address}"

    def names(self) -> list[str]:
        return sorted(self._transports)

    def check(self, names: list[str]) -> list[str]:
        """``names`` as given by an operator, each known, or a clear error."""
        names = [self.canonical(n) for n in names]
        for n in names:
            if n not in self._transports:
                raise ConfigError(f"transport {n!r} unknown; supported: {', '.join(self.names())}")
        return names

    def create(self, name: str) -> Transport:
        try:
            return self._transports[self.canonical(name)]()
        except KeyError:
            raise ConfigError(
                f"unknown transport {name!r}; supported: {', '.join(self.names())}"
            ) from None


REGISTRY = TransportRegistry()
