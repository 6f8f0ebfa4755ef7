"""Host identities: Ed25519 keys and the authorized-peers file.

Key files are PEM (PKCS#8) readable only by their owner, like ssh's; public keys
travel as one line ``migd-ed25519 BASE64 [comment]`` so an operator can paste
them into the peer's authorized file.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import BadSignature, ConfigError

KEY_TYPE = "migd-ed25519"


class Credential(Protocol):
    """What one side presents in a handshake (``public``) and proves it holds."""

    public: bytes

    def sign(self, data: bytes) -> bytes: ...


class Presenter(Protocol):
    """This host's identity: an Ed25519 key, or X.509 certificates (``migd.pki``)."""

    def as_role(self, role: Any) -> Credential: ...


class Trust(Protocol):
    """Who this host exchanges state with: authorized keys, or a CA (``migd.pki``).
    ``name_of`` gives the peer's name, None for "not authorized", or raises
    :class:`~migd.errors.UnknownPeer` saying why not."""

    def name_of(self, cred: bytes) -> str | None: ...
    def verify(self, cred: bytes, signature: bytes, data: bytes) -> None: ...
    def describe(self, cred: bytes) -> str: ...
    def for_peer(self, role: Any, host: str) -> Trust: ...
    def __len__(self) -> int: ...


def public_line(pub: bytes, comment: str = "") -> str:
    return f"{KEY_TYPE} {base64.b64encode(pub).decode()}" + (f" {comment}" if comment else "")


def fingerprint(pub: bytes) -> str:
    from hashlib import sha256

    return "SHA256:" + base64.b64encode(sha256(pub).digest()).decode().rstrip("=")


class Identity:
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str) -> Identity:
        try:
            st = os.stat(path)
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ConfigError(f"identity key {path}: {exc.strerror}") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"identity key {path} is accessible by others (mode {st.st_mode & 0o777:o}); "
                "run chmod 600"
            )
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except ValueError:
            raise ConfigError(f"identity key {path}: not a PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"identity key {path}: not an Ed25519 key")
        return cls(key)

    def save(self, path: str, comment: str = "") -> None:
        pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        with open(path + ".pub", "w") as f:
            f.write(public_line(self.public, comment) + "\n")

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def as_role(self, role: Any) -> Identity:
        """What this host presents in ``role``: the one key, whichever way."""
        return self


def verify(pub: bytes, signature: bytes, data: bytes) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(pub).verify(signature, data)
    except (InvalidSignature, ValueError):
        raise BadSignature("peer signature does not verify: it does not hold its key") from None


class AuthorizedKeys:
    """The peers this host exchanges state with."""

    def __init__(self, keys: dict[bytes, str]) -> None:
        self._keys = keys

    @classmethod
    def load(cls, path: str) -> AuthorizedKeys:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as exc:
            raise ConfigError(f"authorized keys {path}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"authorized keys {path}: not UTF-8 text (byte {exc.start}): "
                              "one 'migd-ed25519 BASE64 comment' a line") from None
        keys: dict[bytes, str] = {}
        for no, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(None, 2)
            if len(parts) < 2 or parts[0] != KEY_TYPE:
                raise ConfigError(f"{path}:{no}: expected '{KEY_TYPE} BASE64 [comment]'")
            try:
                raw = base64.b64decode(parts[1], validate=True)
            except (binascii.Error, ValueError):  # (ValueError: not even ASCII)
                raise ConfigError(f"{path}:{no}: key is not valid base64") from None
            if len(raw) != 32:
                raise ConfigError(f"{path}:{no}: an Ed25519 public key is 32 bytes, got {len(raw)}")
            keys[raw] = parts[2] if len(parts) > 2 else fingerprint(raw)
        return cls(keys)

    def name_of(self, pub: bytes) -> str | None:
        return self._keys.get(pub)

    def verify(self, pub: bytes, signature: bytes, data: bytes) -> None:
        verify(pub, signature, data)

    def describe(self, pub: bytes) -> str:
        return f"key {fingerprint(pub)}"

    def for_peer(self, role: Any, host: str) -> AuthorizedKeys:
        """The trust one connection applies: a key is a key, whoever dials whom."""
        return self

    def __len__(self) -> int:
        return len(self._keys)
