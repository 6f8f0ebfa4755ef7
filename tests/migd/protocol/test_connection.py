"""The sans-I/O core, fed whole, a byte at a time, and with trailing garbage."""

from __future__ import annotations

from collections.abc import Callable

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migd.codec import Encoding
from migd.errors import (
    BadSignature,
    FrameTooLarge,
    IntegrityError,
    LinkLost,
    NegotiationError,
    ProtocolError,
    RemoteError,
    UnknownPeer,
    VersionMismatch,
)
from migd.identity import AuthorizedKeys, Identity
from migd.protocol.connection import (
    Closed,
    Connection,
    Control,
    Data,
    Established,
    Event,
    Offer,
    PeerFailed,
)
from migd.protocol.frames import HEADER, HEADER_SIZE, FrameType
from migd.protocol.messages import (
    Accept,
    Ack,
    Announce,
    End,
    Join,
    Message,
    Migrate,
    Outcome,
    Resume,
)
from migd.protocol.migration import Role

Feeder = Callable[[Connection, bytes], None]


def whole(conn: Connection, data: bytes) -> None:
    conn.receive_data(data)


def bytewise(conn: Connection, data: bytes) -> None:
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])


def zero_copy(conn: Connection, data: bytes) -> None:
    """The BufferedProtocol path: fill what get_buffer() hands out, in odd sizes."""
    mv = memoryview(data)
    step = 1
    while mv:
        buf = conn.get_buffer()
        n = min(len(buf), len(mv), step)
        buf[:n] = mv[:n]
        conn.buffer_updated(n)
        mv = mv[n:]
        step = step * 3 % 1000 + 1


FEEDERS = [whole, bytewise, zero_copy]


def out(conn: Connection) -> bytes:
    return b"".join(bytes(f) for f in conn.pop_ready())


def pair(ids: dict[str, Identity], trust: AuthorizedKeys,
         src_id: str = "src", feed: Feeder = whole) -> tuple[Connection, Connection,
                                                            list[Event], list[Event]]:
    src = Connection(Role.SOURCE, ids[src_id], trust)
    dst = Connection(Role.DESTINATION, ids["dst"], trust)
    feed(dst, out(src))
    feed(src, out(dst))
    feed(dst, out(src))
    return src, dst, src.events(), dst.events()


@pytest.mark.parametrize("feed", FEEDERS)
def test_handshake_and_messages(ids: dict[str, Identity], trust: AuthorizedKeys,
                                feed: Feeder) -> None:
    src, dst, sev, dev = pair(ids, trust, feed=feed)
    assert isinstance(sev[0], Established) and sev[0].peer_name == "dst"
    assert isinstance(dev[0], Established) and dev[0].peer_name == "src"
    assert sev[0].cipher == dev[0].cipher == "aes-256-gcm"
    src.send_control(Migrate(id="m1", device="vf0"))
    dst.send_control(Accept(limit=1, token=bytes(32)))
    feed(dst, out(src))
    feed(src, out(dst))
    assert [e.msg for e in dst.events() if isinstance(e, Control)] == [
        Migrate(id="m1", device="vf0")]
    assert [e.msg for e in src.events() if isinstance(e, Control)] == [
        Accept(limit=1, token=bytes(32))]


def seal(src: Connection, index: int, offset: int, data: bytes,
         encoding: int = Encoding.RAW) -> bytes:
    buf = bytearray(HEADER_SIZE + len(data) + 16)
    seq = src.reserve_seq()
    view = memoryview(buf)
    src.seal_data_into(seq, index, offset, encoding, data, len(data), view[:HEADER_SIZE],
                       view[HEADER_SIZE:])
    return bytes(buf)


@pytest.mark.parametrize("feed", FEEDERS)
def test_data_frames_and_trailing_garbage(ids: dict[str, Identity], trust: AuthorizedKeys,
                                          feed: Feeder) -> None:
    src, dst, _, _ = pair(ids, trust)
    frames = seal(src, 0, 0, b"hello") + seal(src, 1, 5, b"world!")
    with pytest.raises(ProtocolError, match="magic"):
        feed(dst, frames + b"\x00garbage-after-the-last-frame" * 3)
    data = [e for e in dst.events() if isinstance(e, Data)]
    assert [(d.header.index, d.header.offset, d.header.plain_len) for d in data] == [
        (0, 0, 5), (1, 5, 6)]
    plain = bytearray(6)
    assert dst.open_data_into(data[1], memoryview(plain)) == 6 and plain == b"world!"


def fresh_pair() -> tuple[Connection, Connection]:
    """Hypothesis examples cannot share function-scoped fixtures: a pair of their own."""
    a, b = Identity.generate(), Identity.generate()
    trust = AuthorizedKeys({a.public: "a", b.public: "b"})
    src = Connection(Role.SOURCE, a, trust)
    dst = Connection(Role.DESTINATION, b, trust)
    dst.receive_data(out(src))
    src.receive_data(out(dst))
    dst.receive_data(out(src))
    return src, dst


_count = st.integers(0, 2**63 - 1)
_MESSAGES = st.one_of(
    st.builds(Announce, more=_count), st.builds(Ack, index=_count, offset=_count),
    st.builds(Join, token=st.binary(min_size=32, max_size=32), channel=_count),
    st.builds(End, length=_count, chunks=_count, digest=st.binary(min_size=32, max_size=32)),
    st.builds(Outcome, id=st.text(max_size=64), decision=st.sampled_from(["commit", "abort"])),
    st.builds(Resume, id=st.text(max_size=64), token=st.binary(min_size=32, max_size=32),
              index=_count, offset=_count, channels=_count),
    st.builds(Migrate, id=st.text(max_size=64), device=st.text(max_size=32),
              compat=st.dictionaries(st.text(max_size=8), st.integers(-5, 5), max_size=4),
              reply_to=st.lists(st.text(max_size=20), max_size=3), precopy=st.booleans()))


@settings(max_examples=60, deadline=None)
@given(msgs=st.lists(_MESSAGES, max_size=6), cut=st.integers(min_value=1, max_value=97))
def test_control_roundtrip(msgs: list[Message], cut: int) -> None:
    src, dst = fresh_pair()
    dst.events()
    for m in msgs:
        src.send_control(m)
    wire = out(src)
    for i in range(0, len(wire), cut):
        dst.receive_data(wire[i : i + cut])
    assert [e.msg for e in dst.events() if isinstance(e, Control)] == msgs


@settings(max_examples=40, deadline=None)
@given(chunks=st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=5))
def test_data_roundtrip(chunks: list[bytes]) -> None:
    src, dst = fresh_pair()
    off = 0
    wire = b""
    for i, c in enumerate(chunks):
        wire += seal(src, i, off, c)
        off += len(c)
    bytewise(dst, wire)
    got = b""
    for e in dst.events():
        if isinstance(e, Data):
            buf = bytearray(e.header.plain_len)
            dst.open_data_into(e, memoryview(buf))
            got += buf
    assert got == b"".join(chunks)


def test_unknown_peer_is_refused_before_any_state(ids: dict[str, Identity],
                                                  trust: AuthorizedKeys) -> None:
    src = Connection(Role.SOURCE, ids["mallory"], trust)
    dst = Connection(Role.DESTINATION, ids["dst"], trust)
    with pytest.raises(UnknownPeer, match="not in this host's authorized keys"):
        dst.receive_data(out(src))
    src.receive_data(out(dst))
    (ev,) = src.events()
    assert isinstance(ev, PeerFailed) and isinstance(ev.error.remote, UnknownPeer)
    with pytest.raises(LinkLost, match="the connection is closed"):
        dst.send_control(Accept(limit=1, token=bytes(32)))  # nothing sealed ever leaves


def test_source_refuses_an_unknown_destination(ids: dict[str, Identity]) -> None:
    only_src = AuthorizedKeys({ids["src"].public: "src"})
    src = Connection(Role.SOURCE, ids["src"], only_src)
    dst = Connection(Role.DESTINATION, ids["dst"],
                     AuthorizedKeys({ids["src"].public: "src"}))
    dst.receive_data(out(src))
    with pytest.raises(UnknownPeer, match="destination key"):
        src.receive_data(out(dst))
    with pytest.raises(LinkLost, match="the connection is closed"):
        src.reserve_seq()


def test_wrong_key_is_refused(ids: dict[str, Identity], trust: AuthorizedKeys) -> None:
    """Mallory presents src's (authorized) public key but cannot sign with it."""
    forged = Identity.generate()
    forged.public = ids["src"].public
    src = Connection(Role.SOURCE, forged, trust)
    dst = Connection(Role.DESTINATION, ids["dst"], trust)
    dst.receive_data(out(src))
    src.receive_data(out(dst))
    with pytest.raises(BadSignature, match="does not hold its key"):
        dst.receive_data(out(src))
    assert not [e for e in dst.events() if isinstance(e, Established)]
    src.receive_data(out(dst))
    assert any(isinstance(e, PeerFailed) and isinstance(e.error.remote, BadSignature)
               for e in src.events())


def test_version_mismatch(ids: dict[str, Identity], trust: AuthorizedKeys) -> None:
    src = Connection(Role.SOURCE, ids["src"], trust, Offer(versions=(99,)))
    dst = Connection(Role.DESTINATION, ids["dst"], trust)
    with pytest.raises(VersionMismatch, match=r"peer speaks protocol \[99\]"):
        dst.receive_data(out(src))
    src.receive_data(out(dst))
    (ev,) = src.events()
    assert isinstance(ev, PeerFailed) and ev.error.remote.code == VersionMismatch.code


def test_no_common_cipher(ids: dict[str, Identity], trust: AuthorizedKeys) -> None:
    src = Connection(Role.SOURCE, ids["src"], trust, Offer(ciphers=("chacha20-poly1305",)))
    dst = Connection(Role.DESTINATION, ids["dst"], trust, Offer(ciphers=("aes-256-gcm",)))
    with pytest.raises(NegotiationError, match="no common cipher"):
        dst.receive_data(out(src))


def test_chacha_negotiated(ids: dict[str, Identity], trust: AuthorizedKeys) -> None:
    src = Connection(Role.SOURCE, ids["src"], trust, Offer(ciphers=("chacha20-poly1305",)))
    dst = Connection(Role.DESTINATION, ids["dst"], trust)
    dst.receive_data(out(src))
    src.receive_data(out(dst))
    dst.receive_data(out(src))
    assert src.cipher == dst.cipher == "chacha20-poly1305"
    dst.events()
    dst.receive_data(seal(src, 0, 0, b"x" * 100))
    (ev,) = dst.events()
    assert isinstance(ev, Data)


def established(ids: dict[str, Identity], trust: AuthorizedKeys) -> tuple[Connection, Connection]:
    src, dst, _, _ = pair(ids, trust)
    return src, dst


def assert_refused_on_open(dst: Connection, frame: bytes | bytearray) -> None:
    """The frame parses (its header is sane) but fails authentication when opened."""
    dst.receive_data(frame)
    (ev,) = dst.events()
    assert isinstance(ev, Data)
    with pytest.raises(IntegrityError, match="authentication failed"):
        dst.open_data_into(ev, memoryview(bytearray(ev.header.plain_len)))


@pytest.mark.parametrize("where", [HEADER_SIZE + 10, HEADER_SIZE - 8],
                         ids=["payload", "header-offset-field"])
def test_flipped_bit_fails_authentication(ids: dict[str, Identity], trust: AuthorizedKeys,
                                          where: int) -> None:
    src, dst = established(ids, trust)
    frame = bytearray(seal(src, 0, 0, b"state" * 100))
    frame[where] ^= 0x01  # the header is authenticated as associated data too
    assert_refused_on_open(dst, frame)


def test_replayed_and_reordered_frames(ids: dict[str, Identity], trust: AuthorizedKeys) -> None:
    src, dst = established(ids, trust)
    f0, f1 = seal(src, 0, 0, b"a" * 10), seal(src, 1, 10, b"b" * 10)
    dst.receive_data(f0)
    with pytest.raises(IntegrityError, match="sequence 0 where 1 was due"):
        dst.receive_data(f0)  # replay
    src2, dst2 = established(ids, trust)
    g0, g1 = seal(src2, 0, 0, b"a" * 10), seal(src2, 1, 10, b"b" * 10)
    with pytest.raises(IntegrityError, match="sequence 1 where 0 was due"):
        dst2.receive_data(g1 + g0)  # reorder
    del f1, g0


def test_frame_from_another_session_fails(ids: dict[str, Identity], trust: AuthorizedKeys) -> None:
    src1, _ = established(ids, trust)
    _, dst2 = established(ids, trust)
    assert_refused_on_open(dst2, seal(src1, 0, 0, b"x" * 64))


def test_oversize_frames(ids: dict[str, Identity], trust: AuthorizedKeys) -> None:
    _, dst = established(ids, trust)
    hdr = HEADER.pack(b"MG", FrameType.DATA, 0, (1 << 20) + 17, 0, 0, 0, 1 << 20)
    with pytest.raises(FrameTooLarge):
        dst.receive_data(hdr)
    _, dst = established(ids, trust)
    hdr = HEADER.pack(b"MG", FrameType.DATA, 0, 1000, 0, 0, 0, (1 << 20) + 1)
    with pytest.raises(FrameTooLarge):
        dst.receive_data(hdr)
    fresh = Connection(Role.DESTINATION, ids["dst"], trust)
    with pytest.raises(FrameTooLarge):
        fresh.receive_data(HEADER.pack(b"MG", FrameType.HELLO, 0, 1 << 30, 0, 0, 0, 0))


def test_sealed_frames_before_handshake_and_handshake_after(
        ids: dict[str, Identity], trust: AuthorizedKeys) -> None:
    fresh = Connection(Role.DESTINATION, ids["dst"], trust)
    with pytest.raises(ProtocolError, match="before the handshake"):
        fresh.receive_data(HEADER.pack(b"MG", FrameType.DATA, 0, 20, 0, 0, 0, 4))
    _, dst = established(ids, trust)
    hello = HEADER.pack(b"MG", FrameType.HELLO, 0, 1, 0, 0, 0, 0) + b"\x80"
    with pytest.raises(ProtocolError, match="after the handshake"):
        dst.receive_data(hello)


def test_garbage_hello(ids: dict[str, Identity], trust: AuthorizedKeys) -> None:
    dst = Connection(Role.DESTINATION, ids["dst"], trust)
    body = msgpack.packb({"versions": [2]})
    with pytest.raises(ProtocolError, match="field 'id'"):
        dst.receive_data(HEADER.pack(b"MG", FrameType.HELLO, 0, len(body), 0, 0, 0, 0) + body)
    dst = Connection(Role.DESTINATION, ids["dst"], trust)
    with pytest.raises(ProtocolError, match="not a valid msgpack"):
        dst.receive_data(HEADER.pack(b"MG", FrameType.HELLO, 0, 3, 0, 0, 0, 0) + b"\xc1\xc1\xc1")


def test_eof_mid_frame_and_clean_eof(ids: dict[str, Identity], trust: AuthorizedKeys) -> None:
    src, dst = established(ids, trust)
    dst.receive_data(seal(src, 0, 0, b"z" * 100)[:50])
    with pytest.raises(LinkLost, match="middle of a frame"):
        dst.receive_eof()
    _, dst = established(ids, trust)
    dst.receive_eof()
    assert isinstance(dst.events()[-1], Closed)


def test_errors_cross_the_wire_as_codes(ids: dict[str, Identity], trust: AuthorizedKeys) -> None:
    src, dst = established(ids, trust)
    dst.send_error(IntegrityError("chunk 7 at offset 9 bad"))
    src.receive_data(out(dst))
    (ev,) = src.events()
    assert isinstance(ev, PeerFailed) and isinstance(ev.error, RemoteError)
    assert isinstance(ev.error.remote, IntegrityError)
    src2, dst2 = established(ids, trust)
    dst2.send_error(RuntimeError("/secret/path leaked?"))
    src2.receive_data(out(dst2))
    (ev,) = src2.events()
    assert isinstance(ev, PeerFailed) and "secret" not in ev.error.message
