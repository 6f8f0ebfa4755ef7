"""The fuzz targets under Hypothesis, a bounded slice in every test run: random
bytes, and inputs built to get past the first checks (frames with a valid
header, maps with the right keys, requests naming real commands, TOML with real
keys).  Any input either parses or raises the documented error: the target
re-raises nothing else.  ``bench/fuzz.py`` runs the same targets for millions."""

from __future__ import annotations

import json
import os

import msgpack
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migd import schema
from migd.codec import Encoding, bitmap_len
from migd.config import DEFAULTS, TOP
from migd.protocol.frames import HEADER, MAGIC, FrameType
from migd.protocol.messages import MESSAGES
from transports.rdma import wire

from .targets import TARGETS, _identities, run

SLICE = settings(max_examples=int(os.environ.get("MIGD_FUZZ_EXAMPLES", "150")), deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


def _packable(v: object) -> object:
    """msgpack cannot pack integers past 64 bits: clamp them."""
    if isinstance(v, int) and not isinstance(v, bool):
        return max(-2**63, min(v, 2**64 - 1))
    if isinstance(v, list):
        return [_packable(x) for x in v]
    if isinstance(v, dict):
        return {k: _packable(x) for k, x in v.items()}
    return v


def frame(ftype: int, body: bytes, payload_len: int | None = None, seq: int = 0) -> bytes:
    n = len(body) if payload_len is None else payload_len
    return HEADER.pack(MAGIC, ftype, 0, n, seq, 0, 0, 0) + body


hello_maps = st.fixed_dictionaries({}, optional={
    "versions": st.lists(st.integers(0, 4), max_size=3) | values,
    # (the authorized source's and destination's keys too: past the first refusal)
    "id": st.sampled_from([_identities()[0].public, _identities()[1].public])
          | st.binary(min_size=32, max_size=32) | values,
    "eph": st.binary(min_size=32, max_size=32) | values,
    "nonce": st.binary(min_size=16, max_size=32) | values,
    "ciphers": st.lists(st.sampled_from(["aes-256-gcm", "chacha20-poly1305", "none", "x"]),
                        max_size=3) | values,
    "max_chunk": st.integers(-1, 1 << 26) | values,
    "channel": st.integers(-1, 1 << 17) | values,
})


@st.composite
def handshake_streams(draw: st.DrawFn) -> bytes:
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        ftype = draw(st.sampled_from(list(FrameType)) | st.integers(0, 255))
        body = msgpack.packb(_packable(draw(hello_maps | values)))
        lie = draw(st.none() | st.integers(0, 1 << 32 - 1))
        parts.append(frame(ftype, body, lie))
    tail = draw(st.binary(max_size=64))
    return bytes([draw(st.integers(0, 255))]) + b"".join(parts) + tail


@st.composite
def control_maps(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(sorted(MESSAGES)) | st.text(max_size=6))
    cls = MESSAGES.get(kind)
    fields = list(cls.__dataclass_fields__) if cls is not None else []
    body: dict[str, object] = {"t": kind}
    every: bool = draw(st.booleans())
    if fields and every:  # every field there, each of a plausible but maybe wrong type
        plausible: list[object] = [0, 1, "", "x", b"", b"\0" * 32, True, [], 2**40]
        body |= {f: draw(st.sampled_from(plausible)) for f in fields}
    else:
        for f in fields:  # a random subset, of random types
            if draw(st.booleans()):
                body[f] = draw(values)
    return msgpack.packb(_packable(body))


@st.composite
def chunk_payloads(draw: st.DrawFn) -> bytes:
    n = draw(st.integers(0, 9000))
    enc = draw(st.sampled_from(list(Encoding)) | st.integers(0, 255))
    plain = draw(st.binary(max_size=64)) * (n // 64 + 1)
    plain = plain[:n] if len(plain) >= n else plain + bytes(n - len(plain))
    if enc == Encoding.ZSTD:
        payload = bytearray(zstandard.ZstdCompressor().compress(plain))
    elif enc == Encoding.SPARSE:
        payload = bytearray(draw(st.binary(min_size=bitmap_len(n), max_size=bitmap_len(n)))
                            + draw(st.binary(max_size=3000)))
    else:
        payload = bytearray(plain)
    for _ in range(draw(st.integers(0, 3))):  # flip, cut or extend
        if payload and draw(st.booleans()):
            payload[draw(st.integers(0, len(payload) - 1))] ^= 1 << draw(st.integers(0, 7))
        elif draw(st.booleans()):
            del payload[draw(st.integers(0, len(payload))):]
        else:
            payload += draw(st.binary(max_size=16))
    claimed = draw(st.sampled_from([n, n + 1, max(0, n - 1)]) | st.integers(0, 65535))
    return bytes([int(enc) & 0xFF]) + claimed.to_bytes(2, "big") + bytes(payload)


@st.composite
def wire_streams(draw: st.DrawFn) -> bytes:
    out = [bytes([draw(st.integers(0, 255))])]
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(list(wire.Op)) | st.integers(0, 255))
        length = draw(st.integers(0, 70000) | st.sampled_from([wire.MAX_SEND + 1, 1 << 32 - 1]))
        key = draw(st.sampled_from([7, 0, 8]))
        offset = draw(st.integers(0, 70000) | st.just(2**64 - 1))
        out.append(wire.MSG.pack(op, key, draw(st.integers(0, 2**32 - 1)), offset,
                                 length & 0xFFFFFFFF))
        out.append(draw(st.binary(max_size=min(length, 2000))))
    return b"".join(out)


@st.composite
def control_lines(draw: st.DrawFn) -> bytes:
    cmd = draw(st.sampled_from(sorted(schema.COMMANDS)) | st.text(max_size=8))
    fields = list(schema.COMMANDS.get(cmd, {}))
    args = {f: draw(json_values) for f in fields if draw(st.booleans())}
    if draw(st.booleans()):
        args[draw(st.text(max_size=6))] = draw(json_values)
    req: dict[str, object] = {"execute": cmd, "arguments": args}
    if draw(st.booleans()):
        req["id"] = draw(json_values)
    text = json.dumps(req, allow_nan=True)
    if draw(st.booleans()):  # and now damage it
        i = draw(st.integers(0, len(text)))
        text = text[:i] + draw(st.text(max_size=4)) + text[i:]
    return text.encode("utf-8", "surrogatepass")


def toml_value(draw: st.DrawFn) -> str:
    return draw(st.sampled_from(["0", "-1", "1.5", "nan", "inf", "true", '"x"', '"1M"', "[]",
                                 '["a", 1]', "{}", '"127.0.0.1:1"', "1e400", '"aes-256-gcm"',
                                 "99999999999999999999"]) | st.integers().map(str))


@st.composite
def config_files(draw: st.DrawFn) -> bytes:
    lines = [f"{k} = {toml_value(draw)}" for k in draw(st.lists(st.sampled_from(sorted(TOP)),
                                                                 max_size=5, unique=True))]
    if draw(st.booleans()):
        lines.append("[defaults]")
        lines += [f"{k} = {toml_value(draw)}" for k in draw(st.lists(
            st.sampled_from(sorted(DEFAULTS)), max_size=4, unique=True))]
    if draw(st.booleans()):
        lines += ["[devices.vf0]", f"backend = {toml_value(draw)}",
                  f"options = {{ size = {toml_value(draw)} }}", f"address = {toml_value(draw)}"]
    data = "\n".join(lines).encode()
    if draw(st.booleans()):
        i = draw(st.integers(0, len(data)))
        data = data[:i] + draw(st.binary(max_size=4)) + data[i:]
    return data


STRUCTURED = {
    "connection_handshake": handshake_streams(),
    "connection_reply": handshake_streams(),
    "connection_frames": st.binary(max_size=16).flatmap(
        lambda head: st.builds(lambda seq, ftype, body: head[:1] + frame(ftype, body, seq=seq),
                               st.integers(0, 3), st.sampled_from(list(FrameType)),
                               st.binary(max_size=200))),
    "control_message": control_maps(),
    "chunk_decoder": chunk_payloads(),
    "rdma_wire": wire_streams(),
    "control_request": control_lines(),
    "config_file": config_files(),
    "authorized_keys": st.lists(st.sampled_from([
        "migd-ed25519 " + "A" * 43 + "=", "migd-ed25519 !!", "# c", "", "ssh-rsa AAAA",
        "migd-ed25519 " + "A" * 44 + " name"]) | st.text(max_size=30)
        | st.text(max_size=50).map(lambda t: "migd-ed25519 " + t), max_size=4).map(
            lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass")),
}


@pytest.mark.parametrize("name", sorted(TARGETS))
@SLICE
@given(data=st.data())
def test_any_input_parses_or_raises_the_documented_error(name: str, data: st.DataObject
                                                         ) -> None:
    blob = data.draw(STRUCTURED[name] | st.binary(max_size=512), label="input")
    run(name, blob)


def test_every_target_has_a_structured_strategy() -> None:
    assert set(STRUCTURED) == set(TARGETS)
