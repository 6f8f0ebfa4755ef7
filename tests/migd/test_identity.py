from __future__ import annotations

import os
import pathlib

import pytest

from migd.crypto import CIPHERS, Sealer, cipher_spec, derive_keys
from migd.errors import ConfigError, IntegrityError
from migd.identity import AuthorizedKeys, Identity, public_line


def test_keygen_save_load_and_permissions(tmp_path: pathlib.Path) -> None:
    ident = Identity.generate()
    key = tmp_path / "id.key"
    ident.save(str(key), "host-a")
    assert key.stat().st_mode & 0o777 == 0o600
    assert Identity.load(str(key)).public == ident.public
    pub = (tmp_path / "id.key.pub").read_text()
    assert pub.startswith("migd-ed25519 ") and pub.strip().endswith("host-a")
    with pytest.raises(FileExistsError):
        ident.save(str(key))
    os.chmod(key, 0o644)
    with pytest.raises(ConfigError, match=r"accessible by others.*chmod 600"):
        Identity.load(str(key))
    with pytest.raises(ConfigError, match="No such file"):
        Identity.load(str(tmp_path / "missing"))
    junk = tmp_path / "junk.key"
    junk.write_text("not a key")
    os.chmod(junk, 0o600)
    with pytest.raises(ConfigError, match="not a PEM private key"):
        Identity.load(str(junk))


def test_authorized_keys_file(tmp_path: pathlib.Path) -> None:
    a = Identity.generate()
    f = tmp_path / "auth"
    f.write_text(f"# peers\n\n{public_line(a.public, 'host a')}\n")
    keys = AuthorizedKeys.load(str(f))
    assert keys.name_of(a.public) == "host a" and len(keys) == 1
    assert keys.name_of(Identity.generate().public) is None
    for text, msg in [("ssh-rsa AAAA x", ":1: expected"), ("migd-ed25519 !!!", "base64"),
                      ("migd-ed25519 AAAA", "32 bytes")]:
        f.write_text(text + "\n")
        with pytest.raises(ConfigError, match=msg):
            AuthorizedKeys.load(str(f))


@pytest.mark.parametrize("name", sorted(CIPHERS))
def test_sealer_directions_and_tamper(name: str) -> None:
    spec = cipher_spec(name)
    k1, k2 = derive_keys(os.urandom(32), b"transcript", spec.key_size)
    assert k1 != k2
    tx, rx, wrong = Sealer(spec, k1, 0), Sealer(spec, k1, 0), Sealer(spec, k2, 0)
    out = bytearray(100 + 16)
    tx.seal_into(5, b"hdr", b"p" * 100, memoryview(out))
    plain = bytearray(100)
    rx.open_into(5, b"hdr", bytes(out), memoryview(plain))
    assert plain == b"p" * 100
    for seq, aad, key in [(6, b"hdr", rx), (5, b"hdX", rx), (5, b"hdr", wrong)]:
        with pytest.raises(IntegrityError):
            key.open_into(seq, aad, bytes(out), memoryview(plain))
    assert Sealer(spec, k1, 1).nonce(5) != tx.nonce(5)  # channels never share nonces
    # sealing pieces is sealing their join (AES-GCM in one pass, the others by joining)
    pieces = [memoryview(b"bitmap"), memoryview(os.urandom(5000)), memoryview(b"x" * 33)]
    joined = b"".join(pieces)
    whole, parts = bytearray(len(joined) + 16), bytearray(len(joined) + 64)
    tx.seal_into(7, b"hdr", joined, memoryview(whole))
    n = tx.seal_pieces_into(7, b"hdr", pieces, memoryview(parts))
    assert n == len(whole) and parts[:n] == whole
    assert tx.takes_pieces == (name == "aes-256-gcm")
    with pytest.raises(ConfigError, match="supported"):
        cipher_spec("rot13")


@pytest.mark.parametrize("name", sorted(CIPHERS))
def test_opening_in_pieces(name: str) -> None:
    """The receiver opens a chunk straight into device memory, run by run."""
    spec = cipher_spec(name)
    key = os.urandom(spec.key_size)
    tx, rx = Sealer(spec, key, 0), Sealer(spec, key, 0)
    if not rx.takes_pieces:  # no streaming opener: such chunks are opened whole
        assert rx.opener(7, b"hdr") is None
        return
    pieces = [b"bitmap", os.urandom(5000), b"x" * 33]
    joined = b"".join(pieces)
    sealed = bytearray(len(joined) + 16)
    tx.seal_into(7, b"hdr", joined, memoryview(sealed))
    opener = rx.opener(7, b"hdr")
    assert opener is not None
    places = [bytearray(len(p)) for p in pieces]
    pos = 0
    for place in places:
        opener.update_into(memoryview(sealed)[pos : pos + len(place)], memoryview(place))
        pos += len(place)
    opener.finish(memoryview(sealed)[-16:])
    assert places == pieces
    tag_ok = bytes(sealed[-16:])
    for seq, aad, tag in [(7, b"hdr", bytes(16)), (8, b"hdr", tag_ok), (7, b"hdX", tag_ok)]:
        opener = rx.opener(seq, aad)
        assert opener is not None
        opener.update_into(memoryview(sealed)[: len(joined)], memoryview(bytearray(len(joined))))
        with pytest.raises(IntegrityError, match=f"frame {seq}"):
            opener.finish(tag)


def test_an_authorized_keys_file_that_is_not_text_is_named(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "authorized_keys"
    path.write_bytes(b"migd-ed25519 \xff\xfe\x00garbage\n")
    with pytest.raises(ConfigError, match=f"authorized keys {path}: not UTF-8 text .byte 13."):
        AuthorizedKeys.load(str(path))


def test_a_key_that_is_not_even_ascii_is_named_not_raised(tmp_path: pathlib.Path) -> None:
    # found by bench/fuzz.py (authorized_keys): base64 of non-ASCII text raised ValueError
    path = tmp_path / "authorized_keys"
    path.write_text("# c\nmigd-ed25519 AAAAAAAAAAAAAAAAAA\u0083\n")
    with pytest.raises(ConfigError, match=":2: key is not valid base64"):
        AuthorizedKeys.load(str(path))
