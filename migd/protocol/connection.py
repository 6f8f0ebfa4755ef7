"""The sans-I/O protocol core: bytes in, events out; messages in, frames out.

:class:`Connection` does no I/O and reads no clock.  Feed it received bytes
(``receive_data``, or the zero-copy pair ``get_buffer``/``buffer_updated``),
collect :meth:`events`, and send what :meth:`pop_ready` hands out, in order.

Handshake (mutual, SIGMA-style), all msgpack::

    source -> HELLO        versions, identity key, ephemeral X25519 key, nonce, offers
    dest   -> HELLO_REPLY  {core: versions, identity, ephemeral, choices;
                            sig: Ed25519(dest, "destination" || transcript)}
    source -> AUTH         {sig: Ed25519(source, "source" || transcript)}

On a channel whose transport places payloads by one-sided writes (the RDMA-like
transport), a DATA frame's payload is not in the byte stream: it already lies
in a buffer this side posted, and ``data_buffers`` hands that buffer over when
the header arrives (``payloads_inline=False``).  The checks are the same.

Keys come from HKDF over the X25519 secret salted with the transcript hash, one
per direction.  A peer whose identity is not in the authorized file, or whose
signature fails, gets a PLAIN_ERROR and no state moves.  After the handshake
every frame is sealed and carries the next sequence number of its direction;
anything else (replay, reordering, bad tag, oversize, unknown type, trailing
garbage) is a :class:`ProtocolError` and the connection is dead.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import os
from collections.abc import Callable
from typing import Any

import msgpack
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from ..crypto import CIPHERS, TAG_SIZE, Opener, Sealer, cipher_spec, derive_keys
from ..errors import (
    FrameTooLarge,
    IntegrityError,
    LinkLost,
    MigdError,
    NegotiationError,
    ProtocolError,
    RemoteError,
    UnknownPeer,
    VersionMismatch,
    from_wire,
    to_wire,
)
from ..identity import Presenter, Trust
from .frames import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_CHUNK_LIMIT,
    MAX_CONTROL_PAYLOAD,
    MAX_PLAIN_PAYLOAD,
    FrameType,
    Header,
)
from .messages import Message, decode, encode
from .migration import Role

#: 2: the switchover is a two-phase commit for every migration (loaded, go), and a
#: broken stream can be resumed; a version-1 peer is refused with a clear error.
PROTOCOL_VERSIONS = (2,)


class Phase(enum.Enum):
    HANDSHAKE = "handshake"
    ESTABLISHED = "established"
    CLOSED = "closed"


# --- events ----------------------------------------------------------------------


@dataclasses.dataclass
class Established:
    peer_name: str
    peer_key: bytes
    cipher: str
    max_chunk: int
    hello: dict[str, Any]


@dataclasses.dataclass
class Control:
    msg: Message


@dataclasses.dataclass
class Data:
    """A sealed data chunk whose payload sits in ``buf[:header.payload_len]``."""

    header: Header
    buf: bytearray | memoryview
    #: The header as received: the AEAD associated data, and what the stream digest
    #: hashes (packed once, not again per use).
    raw: bytes

    @property
    def body_len(self) -> int:
        """Ciphertext bytes (the payload without its tag)."""
        return self.header.payload_len - TAG_SIZE

    @property
    def body(self) -> memoryview:
        """The ciphertext, where it landed."""
        return memoryview(self.buf)[: self.body_len]

    @property
    def tag(self) -> memoryview:
        """The AEAD tag ending the payload (for a piecewise opener's finish)."""
        return memoryview(self.buf)[self.body_len : self.header.payload_len]

    @property
    def sealed(self) -> memoryview:
        """Ciphertext and tag, as the stream digest folds them."""
        return memoryview(self.buf)[: self.header.payload_len]


@dataclasses.dataclass
class PeerFailed:
    error: RemoteError


@dataclasses.dataclass
class Closed:
    """The peer closed its side."""


Event = Established | Control | Data | PeerFailed | Closed


@dataclasses.dataclass
class Offer:
    """What this side proposes or accepts."""

    ciphers: tuple[str, ...] = ("aes-256-gcm", "chacha20-poly1305")
    max_chunk: int = 1 << 20
    versions: tuple[int, ...] = PROTOCOL_VERSIONS
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes | bytearray | memoryview, what: str) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception:
        raise ProtocolError(f"{what}: not a valid msgpack message") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what}: expected a map")
    return obj


def _field(msg: dict[str, Any], key: str, typ: type | tuple[type, ...], what: str) -> Any:
    value = msg.get(key)
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is int):
        raise ProtocolError(f"{what}: field {key!r} missing or of the wrong type")
    return value


def _peer_error(msg: dict[str, Any]) -> RemoteError:
    code, message = msg.get("code"), msg.get("message")
    if isinstance(code, bool) or not isinstance(code, int) or not isinstance(message, str):
        raise ProtocolError("error: fields 'code' and 'message' missing or of the wrong type")
    return from_wire(code, message)


def _raw_x25519(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


BufferSource = Callable[[int], bytearray | memoryview | None]


class Connection:
    """One channel of one migration, from one side."""

    def __init__(self, role: Role, identity: Presenter, authorized: Trust,
                 offer: Offer | None = None, channel: int = 0,
                 data_buffers: BufferSource | None = None, payloads_inline: bool = True,
                 peer_host: str = "") -> None:
        self.role = role
        self.channel = channel
        self.phase = Phase.HANDSHAKE
        self._identity = identity.as_role(role)
        # A source checks the destination against the host it dialled (``peer_host``).
        self._authorized = authorized.for_peer(role, peer_host)
        self._offer = offer or Offer()
        self._eph = X25519PrivateKey.generate()
        self._nonce = os.urandom(32)
        self._hello_bytes = b""
        self._reply_core = b""
        self._shared = b""
        self._events: list[Event] = []
        self._out: dict[int, list[bytes | bytearray | memoryview]] = {}
        self._plain_out: list[bytes] = []
        self._tx_seq = 0
        self._tx_next = 0
        self._rx_seq = 0
        self._tx: Sealer | None = None
        self._rx: Sealer | None = None
        self.cipher = ""
        self.max_chunk = self._offer.max_chunk
        self.peer_name = ""
        #: Destination: the authorized name a well-formed HELLO claimed, not yet
        #: proven (the AUTH signature proves it): such a connection is no longer
        #: a stranger to be dropped for newcomers (``migd.admission``).
        self.claimed = ""
        #: Where a DATA payload lands: given its size, a buffer (None: none free yet,
        #: the edge pauses reading until :meth:`unblock`).  The endpoint installs the
        #: pipeline's; a bare connection allocates.
        self.data_buffers: BufferSource = data_buffers or (lambda n: bytearray(n))
        self.payloads_inline = payloads_inline
        # receive state
        self._hdr = bytearray(HEADER_SIZE)
        self._hdr_got = 0
        self._cur: Header | None = None
        self._payload: bytearray | memoryview | None = None
        self._payload_got = 0
        #: True while a DATA payload waits for a buffer: the edge must pause reading.
        self.blocked = False
        if role is Role.SOURCE:
            self._send_hello()

    # --- output ----------------------------------------------------------------

    def _queue_plain(self, ftype: FrameType, body: bytes) -> None:
        self._plain_out.append(Header(ftype, 0, len(body), 0, 0, 0, 0).pack() + body)

    def pop_ready(self) -> list[bytes | bytearray | memoryview]:
        """Frames ready to go, in sequence order; the caller writes them as given."""
        out: list[bytes | bytearray | memoryview] = []
        if self._plain_out:
            out.extend(self._plain_out)
            self._plain_out.clear()
        while self._tx_next in self._out:
            out.extend(self._out.pop(self._tx_next))
            self._tx_next += 1
        return out

    def has_output(self) -> bool:
        return bool(self._plain_out) or self._tx_next in self._out

    def reserve_seq(self) -> int:
        if self.phase is Phase.CLOSED:
            raise LinkLost(f"{self.role.value}: the connection is closed")
        if self.phase is not Phase.ESTABLISHED:
            raise ProtocolError(f"{self.role.value}: cannot send sealed frames during {self.phase.value}")
        seq = self._tx_seq
        self._tx_seq += 1
        return seq

    @property
    def seals_pieces(self) -> bool:
        """Whether :meth:`seal_data_into` takes a payload in pieces without joining them."""
        return self._tx is not None and self._tx.takes_pieces

    @property
    def opens_pieces(self) -> bool:
        """Whether :meth:`opener` gives a streaming opener for this channel's payloads."""
        return self._rx is not None and self._rx.takes_pieces

    def seal_data_into(self, seq: int, index: int, offset: int, encoding: int,
                       payload: bytes | memoryview | list[memoryview], plain_len: int,
                       header_out: memoryview, payload_out: memoryview) -> memoryview:
        """Seal one data chunk: its header into ``header_out[:HEADER_SIZE]``, ciphertext
        and tag into ``payload_out`` (which ``payload`` may already be the start of:
        sealing in place; or a list of pieces).  Returns the sealed payload.  Thread-safe."""
        assert self._tx is not None
        size = sum(len(p) for p in payload) if isinstance(payload, list) else len(payload)
        plen = size + TAG_SIZE
        HEADER.pack_into(header_out, 0, MAGIC, FrameType.DATA, encoding, plen, seq, index,
                         offset, plain_len)
        if isinstance(payload, list):
            self._tx.seal_pieces_into(seq, header_out[:HEADER_SIZE], payload, payload_out)
        else:
            self._tx.seal_into(seq, header_out[:HEADER_SIZE], payload, payload_out[:plen])
        return payload_out[:plen]

    def submit(self, seq: int, frame: memoryview | bytes | bytearray) -> None:
        """Hand back a sealed frame for ``seq``; :meth:`pop_ready` releases it in order."""
        self._out[seq] = [frame]

    def send_control(self, msg: Message) -> None:
        body = _pack(encode(msg))
        if len(body) + TAG_SIZE > MAX_CONTROL_PAYLOAD:
            raise ProtocolError("control message too large")
        self._seal_control(self.reserve_seq(), body)

    def _seal_control(self, seq: int, body: bytes) -> None:
        assert self._tx is not None
        header = Header(FrameType.CONTROL, 0, len(body) + TAG_SIZE, seq, 0, 0, len(body)).pack()
        out = bytearray(HEADER_SIZE + len(body) + TAG_SIZE)
        out[:HEADER_SIZE] = header
        self._tx.seal_into(seq, header, body, memoryview(out)[HEADER_SIZE:])
        self.submit(seq, out)

    def send_error(self, err: BaseException) -> None:
        """Tell the peer why we stop: a code and a public message, never internals.

        Works after our receive side failed too: that is when the peer most needs it.
        """
        code, message = to_wire(err)
        if self._tx is not None:
            # It goes right after what already went out: frames still waiting for an
            # earlier one (a pipeline stopped midway) never will.
            self._out.clear()
            self._tx_seq = self._tx_next + 1
            self._seal_control(self._tx_next,
                               _pack({"t": "error", "code": code, "message": message}))
        else:
            self._queue_plain(FrameType.PLAIN_ERROR, _pack({"code": code, "message": message}))

    # --- input -----------------------------------------------------------------

    def events(self) -> list[Event]:
        ev, self._events = self._events, []
        return ev

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Copying input path (tests, small peers): feeds ``data`` whole."""
        mv = memoryview(data)
        while mv:
            buf = self.get_buffer()
            n = min(len(buf), len(mv))
            buf[:n] = mv[:n]
            mv = mv[n:]
            self.buffer_updated(n)
            if self.blocked and mv:
                raise ProtocolError("receiver has no free buffer")

    def receive_eof(self) -> None:
        self._events.append(Closed())
        midway = self._hdr_got or self._cur is not None
        self.phase = Phase.CLOSED
        if midway:
            raise LinkLost("connection closed in the middle of a frame")

    def get_buffer(self) -> memoryview:
        """Where the next received bytes should land (zero-copy for payloads)."""
        if self.phase is Phase.CLOSED:
            raise ProtocolError("connection is closed")
        if self._cur is None:
            return memoryview(self._hdr)[self._hdr_got :]
        assert self._payload is not None
        return memoryview(self._payload)[self._payload_got : self._cur.payload_len]

    def buffer_updated(self, n: int) -> None:
        try:
            if self._cur is None:
                self._hdr_got += n
                if self._hdr_got == HEADER_SIZE:
                    self._take_header()
            else:
                self._payload_got += n
            if self._cur is not None and self._payload_got == self._cur.payload_len:
                self._take_frame()
        except MigdError:
            self.phase = Phase.CLOSED
            raise

    def unblock(self) -> bool:
        """Retry taking a buffer for the waiting DATA payload; True when reading may resume."""
        if self.blocked and self._cur is not None:
            buf = self.data_buffers(self._cur.payload_len)
            if buf is not None:
                self._payload = buf
                self.blocked = False
        return not self.blocked

    def _take_header(self) -> None:
        magic, ftype, enc, plen, seq, index, offset, plain_len = HEADER.unpack(self._hdr)
        if magic != MAGIC:
            raise ProtocolError("bad frame magic (not a migd peer, or garbage in the stream)")
        try:
            ft = FrameType(ftype)
        except ValueError:
            raise ProtocolError(f"unknown frame type {ftype}") from None
        hdr = Header(ft, enc, plen, seq, index, offset, plain_len)
        if ft in (FrameType.CONTROL, FrameType.DATA):
            if self.phase is not Phase.ESTABLISHED:
                raise ProtocolError(f"sealed {ft.name} frame before the handshake completed")
            if seq != self._rx_seq:
                raise IntegrityError(
                    f"frame sequence {seq} where {self._rx_seq} was due (replayed, reordered or lost)"
                )
            self._rx_seq += 1
            limit = (self.max_chunk + TAG_SIZE if ft is FrameType.DATA else MAX_CONTROL_PAYLOAD)
            if plen > limit or plen < TAG_SIZE or (ft is FrameType.DATA and plain_len > self.max_chunk):
                raise FrameTooLarge(f"{ft.name} frame of {plen} bytes exceeds the limit {limit}")
        else:
            # The destination judges our AUTH after we consider the handshake done:
            # its refusal comes in the clear, before any sealed frame from it.
            late_refusal = ft is FrameType.PLAIN_ERROR and self._rx_seq == 0
            if self.phase is not Phase.HANDSHAKE and not late_refusal:
                raise ProtocolError(f"{ft.name} frame after the handshake")
            if plen > MAX_PLAIN_PAYLOAD:
                raise FrameTooLarge(f"{ft.name} frame of {plen} bytes exceeds {MAX_PLAIN_PAYLOAD}")
        self._cur = hdr
        self._payload_got = 0
        if ft is FrameType.DATA:
            buf = self.data_buffers(plen)
            self._payload = buf
            if not self.payloads_inline:
                if buf is None or len(buf) < plen:
                    raise ProtocolError(f"DATA frame {seq}: no payload of {plen} bytes was "
                                        "written for it")
                self._payload_got = plen  # it is already in place
            self.blocked = buf is None
        else:
            self._payload = bytearray(plen)

    def _take_frame(self) -> None:
        hdr, payload = self._cur, self._payload
        assert hdr is not None and payload is not None
        self._cur = None
        self._payload = None
        self._hdr_got = 0
        if hdr.type == FrameType.DATA:
            self._events.append(Data(hdr, payload, bytes(self._hdr)))
            return
        body = memoryview(payload)[: hdr.payload_len]
        if hdr.type == FrameType.CONTROL:
            assert self._rx is not None
            plain = bytearray(hdr.payload_len - TAG_SIZE)
            self._rx.open_into(hdr.seq, hdr.pack(), body, memoryview(plain))
            msg = _unpack(plain, "control message")
            if msg.get("t") == "error":
                self._events.append(PeerFailed(_peer_error(msg)))
                self.phase = Phase.CLOSED
            else:
                self._events.append(Control(decode(msg)))
        elif hdr.type == FrameType.PLAIN_ERROR:  # handshake refusal
            self._events.append(PeerFailed(_peer_error(_unpack(body, "error frame"))))
            self.phase = Phase.CLOSED
        elif hdr.type == FrameType.HELLO and self.role is Role.DESTINATION and not self._hello_bytes:
            self._on_hello(bytes(body))
        elif hdr.type == FrameType.HELLO_REPLY and self.role is Role.SOURCE and not self._reply_core:
            self._on_reply(bytes(body))
        elif hdr.type == FrameType.AUTH and self.role is Role.DESTINATION and self._reply_core:
            self._on_auth(bytes(body))
        else:
            raise ProtocolError(f"unexpected {FrameType(hdr.type).name} frame during handshake")

    # --- handshake -------------------------------------------------------------

    def _transcript(self) -> bytes:
        h = hashlib.sha256(b"migd/1 handshake")
        for part in (self._hello_bytes, self._reply_core):
            h.update(len(part).to_bytes(4, "big"))
            h.update(part)
        return h.digest()

    def _send_hello(self) -> None:
        hello = {
            "versions": list(self._offer.versions),
            "id": self._identity.public,
            "eph": _raw_x25519(self._eph),
            "nonce": self._nonce,
            "ciphers": list(self._offer.ciphers),
            "max_chunk": self._offer.max_chunk,
            "channel": self.channel,
            **self._offer.extra,
        }
        self._hello_bytes = _pack(hello)
        self._queue_plain(FrameType.HELLO, self._hello_bytes)

    def _refuse(self, err: MigdError) -> MigdError:
        self._queue_plain(FrameType.PLAIN_ERROR, _pack(dict(zip(("code", "message"), to_wire(err),
                                                                 strict=True))))
        return err

    def _on_hello(self, body: bytes) -> None:
        self._hello_bytes = body
        hello = _unpack(body, "HELLO")
        versions = _field(hello, "versions", list, "HELLO")
        common = [v for v in self._offer.versions if v in versions]
        if not common:
            raise self._refuse(VersionMismatch(
                f"peer speaks protocol {versions}, this host speaks {list(self._offer.versions)}"))
        peer = _field(hello, "id", bytes, "HELLO")
        name = self._authorize(peer, "source")
        ciphers = _field(hello, "ciphers", list, "HELLO")
        chosen = next((c for c in ciphers if c in self._offer.ciphers and c in CIPHERS), None)
        if chosen is None:
            raise self._refuse(NegotiationError(
                f"no common cipher: peer offers {ciphers}, this host allows {list(self._offer.ciphers)}"))
        max_chunk = _field(hello, "max_chunk", int, "HELLO")
        self.max_chunk = min(max_chunk, self._offer.max_chunk, MAX_CHUNK_LIMIT)
        channel = _field(hello, "channel", int, "HELLO")
        if not 0 <= channel < 1 << 16:
            raise self._refuse(ProtocolError(f"channel number {channel} out of range"))
        self.channel = channel  # part of every nonce; the keys are this connection's own
        if self.max_chunk < 4096:
            raise self._refuse(NegotiationError(f"chunk size {max_chunk} below 4096"))
        peer_eph = _field(hello, "eph", bytes, "HELLO")
        try:
            self._shared = self._eph.exchange(X25519PublicKey.from_public_bytes(peer_eph))
        except ValueError:
            raise self._refuse(ProtocolError("bad ephemeral key")) from None
        self.cipher, self.peer_name = chosen, name
        self._peer_key = peer
        self._hello = hello
        core = {"version": common[-1], "id": self._identity.public, "eph": _raw_x25519(self._eph),
                "nonce": self._nonce, "cipher": chosen, "max_chunk": self.max_chunk}
        self._reply_core = _pack(core)
        sig = self._identity.sign(b"destination" + self._transcript())
        self._queue_plain(FrameType.HELLO_REPLY, _pack({"core": self._reply_core, "sig": sig}))
        self.claimed = name

    def _authorize(self, peer: bytes, who: str) -> str:
        try:
            name = self._authorized.name_of(peer)
        except MigdError as exc:  # the trust says why not (an X.509 chain, say)
            raise self._refuse(exc) from None
        if name is None:
            raise self._refuse(UnknownPeer(f"{who} {self._authorized.describe(peer)} is not "
                                           "in this host's authorized keys"))
        return name

    def _on_reply(self, body: bytes) -> None:
        reply = _unpack(body, "HELLO_REPLY")
        self._reply_core = _field(reply, "core", bytes, "HELLO_REPLY")
        sig = _field(reply, "sig", bytes, "HELLO_REPLY")
        core = _unpack(self._reply_core, "HELLO_REPLY core")
        if core.get("version") not in self._offer.versions:
            raise self._refuse(VersionMismatch(f"peer chose protocol {core.get('version')!r}"))
        peer = _field(core, "id", bytes, "HELLO_REPLY")
        name = self._authorize(peer, "destination")
        try:
            self._authorized.verify(peer, sig, b"destination" + self._transcript())
        except MigdError as exc:
            raise self._refuse(exc) from None
        cipher = _field(core, "cipher", str, "HELLO_REPLY")
        if cipher not in self._offer.ciphers:
            raise self._refuse(NegotiationError(f"peer chose cipher {cipher!r} we did not offer"))
        max_chunk = _field(core, "max_chunk", int, "HELLO_REPLY")
        if not 4096 <= max_chunk <= self._offer.max_chunk:
            raise self._refuse(NegotiationError(f"peer chose chunk size {max_chunk}"))
        peer_eph = _field(core, "eph", bytes, "HELLO_REPLY")
        try:
            self._shared = self._eph.exchange(X25519PublicKey.from_public_bytes(peer_eph))
        except ValueError:
            raise self._refuse(ProtocolError("bad ephemeral key")) from None
        self.cipher, self.max_chunk, self.peer_name = cipher, max_chunk, name
        self._queue_plain(FrameType.AUTH, _pack({"sig": self._identity.sign(b"source" + self._transcript())}))
        self._establish(peer, {})

    def _on_auth(self, body: bytes) -> None:
        auth = _unpack(body, "AUTH")
        sig = _field(auth, "sig", bytes, "AUTH")
        try:
            self._authorized.verify(self._peer_key, sig, b"source" + self._transcript())
        except MigdError as exc:
            raise self._refuse(exc) from None
        self._establish(self._peer_key, self._hello)

    def _establish(self, peer: bytes, hello: dict[str, Any]) -> None:
        spec = cipher_spec(self.cipher)
        k_sd, k_ds = derive_keys(self._shared, self._transcript(), spec.key_size)
        mine, theirs = (k_sd, k_ds) if self.role is Role.SOURCE else (k_ds, k_sd)
        self._tx = Sealer(spec, mine, self.channel)
        self._rx = Sealer(spec, theirs, self.channel)
        self._shared = b""
        self.phase = Phase.ESTABLISHED
        self._events.append(Established(self.peer_name, peer, self.cipher, self.max_chunk, hello))

    # --- data opening (worker threads) -----------------------------------------

    def opener(self, ev: Data) -> Opener | None:
        """A streaming opener for a DATA payload, when the cipher has one (AES-GCM)."""
        assert self._rx is not None
        return self._rx.opener(ev.header.seq, ev.raw)

    def open_data_into(self, ev: Data, out: memoryview) -> int:
        """Authenticate and decrypt a DATA payload into ``out``. Thread-safe."""
        assert self._rx is not None
        h = ev.header
        return self._rx.open_into(h.seq, ev.raw, memoryview(ev.buf)[: h.payload_len], out)
