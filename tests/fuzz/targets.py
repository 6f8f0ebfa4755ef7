"""Every decoder an outsider can reach, as a function of one byte string.

Each target feeds its input to the real parser and returns normally or raises
the parser's documented error type (:data:`EXPECTED`, a
:class:`~migd.errors.MigdError`); anything else — an IndexError, a
struct.error, a RecursionError, a MemoryError from a length it believed — is a
bug.  The same targets run under Hypothesis in the test suite (bounded) and
under atheris for millions of inputs (``bench/fuzz.py``).

Who reaches what: any host that can connect reaches the handshake and the
frame header (``connection_*``) and the RDMA-like wire (``rdma_wire``); an
authenticated peer reaches control messages (``control_message``) and chunk
payloads (``chunk_decoder``); local users reach the control socket
(``control_request``); the operator's files reach ``config_file`` and
``authorized_keys``.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from collections.abc import Callable

from migd import config, schema
from migd.codec import Decoder
from migd.errors import ConfigError, MigdError, RemoteAccessError
from migd.identity import AuthorizedKeys, Identity
from migd.protocol.connection import Connection, Offer, _unpack
from migd.protocol.messages import Message, decode
from migd.protocol.migration import Role
from transports.rdma import wire

EXPECTED: tuple[type[BaseException], ...] = (MigdError,)


@functools.cache
def _identities() -> tuple[Identity, Identity, AuthorizedKeys]:
    src, dst = Identity.generate(), Identity.generate()
    return src, dst, AuthorizedKeys({src.public: "src", dst.public: "dst"})


def _split(data: bytes) -> tuple[int, bytes]:
    """The first byte says how the rest is cut into receives (1..256 bytes each)."""
    return (data[0] + 1, data[1:]) if data else (1, b"")


def _feed(conn: Connection, data: bytes) -> None:
    step, rest = _split(data)
    for i in range(0, len(rest), step):
        conn.receive_data(rest[i:i + step])
        conn.events()
    conn.pop_ready()


def connection_handshake(data: bytes) -> None:
    """A destination that just accepted a connection: anything a stranger sends."""
    _, dst, trust = _identities()
    _feed(Connection(Role.DESTINATION, dst, trust, Offer()), data)


def connection_reply(data: bytes) -> None:
    """A source that sent its HELLO: anything a host posing as the destination answers."""
    src, _, trust = _identities()
    conn = Connection(Role.SOURCE, src, trust, Offer())
    conn.pop_ready()
    _feed(conn, data)


@functools.cache
def _established_bytes() -> tuple[bytes, bytes]:
    """A real handshake's wire bytes (source's HELLO and AUTH), to replay in front of
    fuzzed frames.  (The destination's keys are fresh per connection, so the frames
    that follow still have to pass its checks: header, sequence, tag.)"""
    src, dst, trust = _identities()
    s = Connection(Role.SOURCE, src, trust, Offer())
    d = Connection(Role.DESTINATION, dst, trust, Offer())
    hello = b"".join(bytes(b) for b in s.pop_ready())
    d.receive_data(hello)
    s.receive_data(b"".join(bytes(b) for b in d.pop_ready()))
    auth = b"".join(bytes(b) for b in s.pop_ready())
    return hello, auth


def connection_frames(data: bytes) -> None:
    """A destination past a HELLO from an authorized key: the AUTH and the frames
    after it, as a peer that holds no session key can send them."""
    _, dst, trust = _identities()
    hello, auth = _established_bytes()
    conn = Connection(Role.DESTINATION, dst, trust, Offer())
    conn.receive_data(hello)
    conn.pop_ready()
    _feed(conn, (data[:1] or b"\0") + auth + data[1:])


def control_message(data: bytes) -> None:
    """An opened CONTROL frame's plaintext, as an authenticated peer may send it."""
    msg = decode(_unpack(data, "control message"))
    assert isinstance(msg, Message)


def chunk_decoder(data: bytes) -> None:
    """A DATA payload: encoding (byte 0), declared plain length (bytes 1-2), payload."""
    if len(data) < 3:
        return
    n = int.from_bytes(data[1:3], "big")
    out = bytearray(n)
    Decoder().decode_into(data[0], memoryview(data[3:]), memoryview(out))


def rdma_wire(data: bytes) -> None:
    """The RDMA-like queue pair's messages, with one registered 64 KiB region."""
    region = bytearray(64 << 10)

    def place(key: int, imm: int, offset: int, length: int) -> memoryview:
        if key != 7 or offset + length > len(region):
            raise RemoteAccessError(f"write to region {key} at {offset}+{length}")
        return memoryview(region)[offset:offset + length]

    step, rest = _split(data)
    for places in (place, None):
        reader = wire.WireReader(places)
        for i in range(0, len(rest), step):
            reader.receive(rest[i:i + step])
            reader.events()


def control_request(data: bytes) -> None:
    """A line on the control socket: never raises, a bad one carries its error."""
    req = schema.request(data, config.Config())
    assert (req.error is None) == (req.command in schema.COMMANDS), req
    if req.error is not None:
        assert isinstance(req.error, ConfigError)


def config_file(data: bytes) -> None:
    config.loads(data, "fuzz.toml")


def authorized_keys(data: bytes) -> None:
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        AuthorizedKeys.load(f.name)


TARGETS: dict[str, Callable[[bytes], None]] = {
    f.__name__: f for f in (connection_handshake, connection_reply, connection_frames,
                            control_message, chunk_decoder, rdma_wire, control_request,
                            config_file, authorized_keys)
}


def run(name: str, data: bytes) -> None:
    """One input through ``name``; re-raises only what is not a documented error."""
    with contextlib.suppress(*EXPECTED):
        TARGETS[name](data)

