"""The migration dialogue's control messages, one typed dataclass each.

A control frame carries one msgpack map whose ``t`` names the message.  Decoding
checks it field by field: a missing field, a wrong type or a value out of range
is a :class:`~migd.errors.ProtocolError` naming the message and the field, so
nothing past the sans-I/O core ever sees an untyped dict from the network.
Unknown fields are ignored (a newer peer may add some); unknown message types
are refused.

Which message is legal when is not decided here but by the migration FSM
(:mod:`migd.protocol.migration`).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

from ..errors import ProtocolError

#: Tokens (join, resume) and digests are SHA-256 sized.
TOKEN_SIZE = 32
DIGEST_SIZE = 32
MAX_TEXT = 256
MAX_LIST = 16
MAX_COMPAT_KEYS = 32


def _meta(**kw: Any) -> dict[str, Any]:
    return kw


def sized(n: int) -> Any:
    """A bytes field of exactly ``n`` bytes."""
    return dataclasses.field(default=b"", metadata=_meta(size=n))


def text(default: str = "", limit: int = MAX_TEXT) -> Any:
    return dataclasses.field(default=default, metadata=_meta(limit=limit))


@dataclasses.dataclass(frozen=True)
class Message:
    """Base of every control message; ``T`` is its wire name."""

    T: ClassVar[str] = ""

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": self.T}
        for f in dataclasses.fields(self):
            out[f.name] = getattr(self, f.name)
        return out


# --- opening a connection: the first message after the handshake ------------------------


@dataclasses.dataclass(frozen=True)
class Migrate(Message):
    """Source -> destination: start an incoming migration into ``device``."""

    T: ClassVar[str] = "migrate"
    id: str = text(limit=64)
    device: str = text()
    kind: str = text(limit=32)
    compat: dict[str, Any] = dataclasses.field(default_factory=dict)
    state_size: int = 0
    precopy: bool = True
    #: Start the destination VF once committed (False: leave it loaded and stopped).
    resume: bool = True
    channels: int = 1
    source_address: str = text(limit=32)
    vm: str = text()
    #: Where the source daemon listens: the destination asks there for the outcome
    #: when the connection breaks after its vote.
    reply_to: list[str] = dataclasses.field(default_factory=list)
    #: Whether the source resumes a broken stream (it keeps what was not acknowledged).
    resumable: bool = True
    #: Acknowledge the loaded position every this many chunks (1..1024).
    ack_every: int = 64


@dataclasses.dataclass(frozen=True)
class Join(Message):
    """Source -> destination, on channel ``channel`` >= 1: join the migration of ``token``."""

    T: ClassVar[str] = "join"
    token: bytes = sized(TOKEN_SIZE)
    channel: int = 0


@dataclasses.dataclass(frozen=True)
class Resume(Message):
    """Source -> destination, on a new connection: continue migration ``id`` from
    chunk ``index`` / stream ``offset`` (the last position the destination
    acknowledged as loaded), over ``channels`` channels."""

    T: ClassVar[str] = "resume"
    id: str = text(limit=64)
    token: bytes = sized(TOKEN_SIZE)
    index: int = 0
    offset: int = 0
    channels: int = 1


@dataclasses.dataclass(frozen=True)
class Resolve(Message):
    """Either side, on a new connection: what became of migration ``id``?  The
    asker says what it knows: the source its decision, the destination nothing."""

    T: ClassVar[str] = "resolve"
    id: str = text(limit=64)
    decision: str = text(limit=16)  # "commit", "abort" or ""


# --- destination -> source ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Accept(Message):
    T: ClassVar[str] = "accept"
    #: Stream bytes the destination accepts in all (announcements past it are refused).
    limit: int = 0
    #: Joins this migration's further channels, and resumes it once.
    token: bytes = sized(TOKEN_SIZE)


@dataclasses.dataclass(frozen=True)
class Joined(Message):
    T: ClassVar[str] = "joined"
    channel: int = 0


@dataclasses.dataclass(frozen=True)
class Resumed(Message):
    """Where the stream continues: the destination's loaded position."""

    T: ClassVar[str] = "resumed"
    index: int = 0
    offset: int = 0
    announced: int = 0
    #: The new token (the one used is spent).
    token: bytes = sized(TOKEN_SIZE)
    #: The destination already loaded, verified and voted: only the decision is missing.
    voted: bool = False


@dataclasses.dataclass(frozen=True)
class Announced(Message):
    T: ClassVar[str] = "announced"
    total: int = 0  # every announcement so far


@dataclasses.dataclass(frozen=True)
class Ack(Message):
    """Chunks below ``index`` (stream bytes below ``offset``) are loaded."""

    T: ClassVar[str] = "ack"
    index: int = 0
    offset: int = 0


@dataclasses.dataclass(frozen=True)
class InitialLoaded(Message):
    T: ClassVar[str] = "initial-loaded"
    offset: int = 0


@dataclasses.dataclass(frozen=True)
class Loaded(Message):
    """The vote: every byte arrived, verified, and the device accepted it
    (RESUMING -> STOP).  Written to the destination's journal before it is sent."""

    T: ClassVar[str] = "loaded"


@dataclasses.dataclass(frozen=True)
class Committed(Message):
    T: ClassVar[str] = "committed"
    running: bool = True


@dataclasses.dataclass(frozen=True)
class Outcome(Message):
    """The answer to :class:`Resolve`: ``commit``, ``abort``, ``pending`` (not
    decided yet: ask again) or ``unknown`` (no such migration here)."""

    T: ClassVar[str] = "outcome"
    id: str = text(limit=64)
    decision: str = text(limit=16)


# --- source -> destination, during a migration -------------------------------------------


@dataclasses.dataclass(frozen=True)
class Announce(Message):
    T: ClassVar[str] = "announce"
    more: int = 0  # bytes, on top of what was announced before


@dataclasses.dataclass(frozen=True)
class InitialSent(Message):
    T: ClassVar[str] = "initial-sent"
    offset: int = 0


@dataclasses.dataclass(frozen=True)
class End(Message):
    """The end record: what the source sent, and the stream digest over it."""

    T: ClassVar[str] = "end"
    length: int = 0  # stream bytes
    chunks: int = 0
    digest: bytes = sized(DIGEST_SIZE)


@dataclasses.dataclass(frozen=True)
class Go(Message):
    """The decision: COMMIT.  Journaled by the source before it is sent."""

    T: ClassVar[str] = "go"


@dataclasses.dataclass(frozen=True)
class Ping(Message):
    """Keeps a waiting link's silence timers quiet (a paused switchover)."""

    T: ClassVar[str] = "ping"


DECISIONS = ("commit", "abort")
OUTCOMES = ("commit", "abort", "pending", "unknown")

MESSAGES: dict[str, type[Message]] = {
    cls.T: cls for cls in (Migrate, Join, Resume, Resolve, Accept, Joined, Resumed, Announced,
                           Ack, InitialLoaded, Loaded, Committed, Outcome, Announce,
                           InitialSent, End, Go, Ping)}

_HINTS: dict[type[Message], dict[str, Any]] = {
    cls: typing.get_type_hints(cls) for cls in MESSAGES.values()}


def _check(cls: type[Message], f: dataclasses.Field[Any], value: Any) -> Any:
    where = f"{cls.T}: field {f.name!r}"
    typ = _HINTS[cls][f.name]
    origin = typing.get_origin(typ) or typ
    if origin is bool:
        if not isinstance(value, bool):
            raise ProtocolError(f"{where} must be true or false")
    elif origin is int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 63:
            raise ProtocolError(f"{where} must be a whole number from 0 to 2^63")
    elif origin is str:
        limit = f.metadata.get("limit", MAX_TEXT)
        if not isinstance(value, str) or len(value) > limit:
            raise ProtocolError(f"{where} must be a string of at most {limit} characters")
    elif origin is bytes:
        size = f.metadata.get("size")
        if not isinstance(value, bytes) or (size is not None and len(value) != size):
            raise ProtocolError(f"{where} must be {size} bytes")
    elif origin is list:
        if (not isinstance(value, list) or len(value) > MAX_LIST
                or not all(isinstance(v, str) and len(v) <= MAX_TEXT for v in value)):
            raise ProtocolError(f"{where} must be a list of at most {MAX_LIST} strings")
    elif origin is dict:
        if (not isinstance(value, dict) or len(value) > MAX_COMPAT_KEYS
                or not all(isinstance(k, str) for k in value)):
            raise ProtocolError(f"{where} must be a map of at most {MAX_COMPAT_KEYS} entries")
    else:  # pragma: no cover - a message declared with a type this codec does not know
        raise TypeError(f"{where}: unsupported field type {typ!r}")
    return value


def decode(msg: dict[str, Any]) -> Message:
    """A received map as its message; ProtocolError naming message and field."""
    kind = msg.get("t")
    cls = MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown control message {kind!r}")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in msg:
            raise ProtocolError(f"{cls.T}: field {f.name!r} missing")
        values[f.name] = _check(cls, f, msg[f.name])
    return cls(**values)


def encode(msg: Message) -> dict[str, Any]:
    return msg.to_wire()
