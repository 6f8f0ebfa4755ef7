"""X.509 identities: the certificates hypervisors already have for libvirt's and
QEMU's TLS migration, instead of migd's own Ed25519 keys (``identity = "x509"``).

The layout is QEMU's (``/etc/pki/qemu``, or libvirt's ``/etc/pki/libvirt-migrate``):
``ca-cert.pem``, ``server-cert.pem`` + ``server-key.pem`` (presented when this host
receives a migration), ``client-cert.pem`` + ``client-key.pem`` (presented when it
sends one), and optionally ``ca-crl.pem``.  The handshake is the same as with
Ed25519 keys (``migd.protocol.connection``): the ``id`` a side presents is its
certificate chain (PEM), and it proves it holds the key by signing the transcript.
The chain is checked by cryptography's X.509 verifier against the CA: a
destination's certificate must name the host the source dialled (DNS or IP
subject alternative name) and be for server authentication; a source's must be
for client authentication, and may be required to carry one of
``x509_allowed_names``.  Revocation lists are honoured (and must be current),
for every certificate of the chain.
"""

from __future__ import annotations

import datetime
import fnmatch
import ipaddress
import itertools
import os
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from .errors import BadSignature, ConfigError, UnknownPeer

FILES = {"ca": "ca-cert.pem", "crl": "ca-crl.pem", "server": "server-cert.pem",
         "server-key": "server-key.pem", "client": "client-cert.pem",
         "client-key": "client-key.pem"}
#: A chain a peer may present: a few certificates, never megabytes.
MAX_CHAIN = 32 << 10

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def _read(directory: str, what: str) -> bytes:
    path = os.path.join(directory, FILES[what])
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"x509: {path}: {exc.strerror}") from None


def _certs(data: bytes, path: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(f"x509: {path}: not PEM certificates ({exc})") from None
    return certs


def _sign(key: SigningKey, data: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    return key.sign(data, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH),
                    hashes.SHA256())


def _verify(cert: x509.Certificate, signature: bytes, data: bytes) -> None:
    pub = cert.public_key()
    try:
        if isinstance(pub, ed25519.Ed25519PublicKey):
            pub.verify(signature, data)
        elif isinstance(pub, ec.EllipticCurvePublicKey):
            pub.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(pub, rsa.RSAPublicKey):
            pub.verify(signature, data, padding.PSS(padding.MGF1(hashes.SHA256()),
                                                     padding.PSS.DIGEST_LENGTH), hashes.SHA256())
        else:
            raise BadSignature(f"peer certificate has an unsupported key type {type(pub).__name__}")
    except InvalidSignature:
        raise BadSignature("peer signature does not verify: it does not hold the key of its "
                           "certificate") from None


def subject(cert: x509.Certificate) -> str:
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cn[0].value) if cn else cert.subject.rfc4514_string()


class _Signer:
    """One certificate chain and its key: what a side presents and signs with."""

    def __init__(self, chain_pem: bytes, key: SigningKey) -> None:
        self.public = chain_pem
        self._key = key

    def sign(self, data: bytes) -> bytes:
        return _sign(self._key, data)


class X509Identity:
    """This host's two certificates: the server one to receive, the client one to send."""

    def __init__(self, server: _Signer, client: _Signer) -> None:
        self.server, self.client = server, client

    @classmethod
    def load(cls, directory: str) -> X509Identity:
        def signer(cert: str, key: str) -> _Signer:
            chain = _read(directory, cert)
            _certs(chain, os.path.join(directory, FILES[cert]))
            path = os.path.join(directory, FILES[key])
            st = os.stat(path) if os.path.exists(path) else None
            if st is not None and st.st_mode & 0o077:
                raise ConfigError(f"x509: {path} is accessible by others (mode "
                                  f"{st.st_mode & 0o777:o}); run chmod 600")
            try:
                k = serialization.load_pem_private_key(_read(directory, key), password=None)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"x509: {path}: not an unencrypted PEM key ({exc})") from None
            if not isinstance(k, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
                              | ed25519.Ed25519PrivateKey):
                raise ConfigError(f"x509: {path}: an RSA, EC or Ed25519 key is needed")
            return _Signer(chain, k)

        return cls(signer("server", "server-key"), signer("client", "client-key"))

    def as_role(self, role: Any) -> _Signer:
        return self.server if role.value == "destination" else self.client


class X509Trust:
    """Who may exchange state with this host: holders of a certificate from the CA."""

    def __init__(self, cas: list[x509.Certificate], crls: list[x509.CertificateRevocationList],
                 allowed: tuple[str, ...] = (), role: str = "", host: str = "") -> None:
        self.cas, self.crls, self.allowed = cas, crls, allowed
        self.role, self.host = role, host

    @classmethod
    def load(cls, directory: str, allowed: tuple[str, ...] = ()) -> X509Trust:
        path = os.path.join(directory, FILES["ca"])
        cas = _certs(_read(directory, "ca"), path)
        crls: list[x509.CertificateRevocationList] = []
        crl_path = os.path.join(directory, FILES["crl"])
        if os.path.exists(crl_path):
            data = _read(directory, "crl")
            try:
                crls = [x509.load_pem_x509_crl(b"-----BEGIN X509 CRL-----" + part)
                        for part in data.split(b"-----BEGIN X509 CRL-----")[1:]]
            except ValueError as exc:
                raise ConfigError(f"x509: {crl_path}: not PEM revocation lists ({exc})") from None
        return cls(cas, crls, allowed)

    def for_peer(self, role: Any, host: str) -> X509Trust:
        """The trust one connection applies: as a source toward ``host`` (its certificate
        must name it), or as a destination (a client certificate)."""
        return X509Trust(self.cas, self.crls, self.allowed, role.value, host)

    def __len__(self) -> int:
        return len(self.cas)

    def describe(self, cred: bytes) -> str:
        try:
            return f"certificate of {subject(x509.load_pem_x509_certificates(cred)[0])!r}"
        except ValueError:
            return "certificate (unreadable)"

    def _chain(self, cred: bytes) -> list[x509.Certificate]:
        if len(cred) > MAX_CHAIN:
            raise UnknownPeer(f"peer certificate chain of {len(cred)} bytes is too long")
        try:
            return x509.load_pem_x509_certificates(cred)
        except ValueError:
            raise UnknownPeer("peer presented no X.509 certificate (is it using migd "
                              "keys while this host uses x509?)") from None

    def name_of(self, cred: bytes) -> str:
        """The peer's name if its chain is good for this connection; else UnknownPeer
        saying why (expired, another CA, another host name, revoked, ...)."""
        certs = self._chain(cred)
        leaf, rest = certs[0], certs[1:]
        now = datetime.datetime.now(datetime.UTC)
        builder = PolicyBuilder().store(Store(self.cas)).time(now)
        who = subject(leaf)
        try:
            if self.role == "source":  # we dialled host: a server certificate for it
                chain = builder.build_server_verifier(_name(self.host)).verify(leaf, rest)
            else:
                chain = builder.build_client_verifier().verify(leaf, rest).chain
        except VerificationError as exc:
            why = str(exc).removeprefix("validation failed: ").split(" (encountered")[0]
            if "candidates exhausted" in why:
                why = "no chain to this host's CA (ca-cert.pem)"
            raise UnknownPeer(f"certificate of {who!r} not accepted: {why}") from None
        self._check_revocation(chain, now)
        if self.role != "source" and self.allowed:
            names = [who, *_dns_names(leaf)]
            if not any(fnmatch.fnmatchcase(n, p) for n in names for p in self.allowed):
                raise UnknownPeer(f"certificate of {who!r} is from the CA but none of its names "
                                  f"({', '.join(names)}) is in x509_allowed_names")
        return who

    def _check_revocation(self, chain: list[x509.Certificate], now: datetime.datetime) -> None:
        for cert, issuer in itertools.pairwise(chain):
            for crl in self.crls:
                if crl.issuer != issuer.subject:
                    continue
                if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
                    raise UnknownPeer(f"the revocation list of {subject(issuer)!r} is not "
                                      "signed by it")
                if crl.next_update_utc is not None and crl.next_update_utc < now:
                    raise UnknownPeer(f"the revocation list of {subject(issuer)!r} is out of "
                                      f"date (next update was {crl.next_update_utc:%Y-%m-%d})")
                if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                    raise UnknownPeer(f"certificate of {subject(cert)!r} (serial "
                                      f"{cert.serial_number:x}) is revoked")

    def verify(self, cred: bytes, signature: bytes, data: bytes) -> None:
        _verify(self._chain(cred)[0], signature, data)


def _name(host: str) -> x509.DNSName | x509.IPAddress:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


def _dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n) for n in san.get_values_for_type(x509.DNSName)]
