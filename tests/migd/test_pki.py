"""X.509 identities: a CA made here, hosts' certificates in QEMU's layout, the
handshake of the protocol core with them, and each way a peer is refused."""

from __future__ import annotations

import datetime
import ipaddress
import pathlib
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from migd.errors import ConfigError, UnknownPeer
from migd.pki import FILES, X509Identity, X509Trust
from migd.protocol.connection import Connection, Established, Event, PeerFailed
from migd.protocol.migration import Role

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


class CA:
    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(NOW - DAY).not_valid_after(NOW + 365 * DAY)
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                     .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                                  False, False), True)
                     .add_extension(x509.SubjectKeyIdentifier.from_public_key(
                         self.key.public_key()), False)
                     .sign(self.key, hashes.SHA256()))
        self.revoked: list[int] = []

    def issue(self, cn: str, usage: x509.ObjectIdentifier, names: list[str],
              not_after: datetime.datetime | None = None
              ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(self.name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(NOW - DAY).not_valid_after(not_after or NOW + 30 * DAY)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
                .add_extension(x509.KeyUsage(True, False, True, False, False, False, False,
                                             False, False), True)
                .add_extension(x509.ExtendedKeyUsage([usage]), False)
                .add_extension(x509.SubjectAlternativeName(sans), False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.key.public_key()), False)
                .sign(self.key, hashes.SHA256()))
        return cert, key

    def crl(self) -> bytes:
        b = (x509.CertificateRevocationListBuilder().issuer_name(self.name)
             .last_update(NOW - DAY).next_update(NOW + 7 * DAY))
        for serial in self.revoked:
            b = b.add_revoked_certificate(x509.RevokedCertificateBuilder()
                                          .serial_number(serial).revocation_date(NOW).build())
        return b.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def host_dir(tmp: pathlib.Path, ca: CA, name: str, addresses: list[str],
             **override: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> str:
    """A host's /etc/pki/qemu: the CA, its server and client certificates and keys."""
    d = tmp / name
    d.mkdir()
    (d / FILES["ca"]).write_bytes(pem(ca.cert))
    for role, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH),
                        ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        cert, key = override.get(role) or ca.issue(name, usage, addresses)
        (d / FILES[role]).write_bytes(pem(cert))
        keyfile = d / FILES[f"{role}-key"]
        keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        keyfile.chmod(0o600)
    return str(d)


def handshake(src_dir: str, dst_dir: str, dialled: str = "127.0.0.1",
              dst_trust: Callable[[str], X509Trust] = X509Trust.load
              ) -> tuple[list[Event], list[Event], Exception | None]:
    src = Connection(Role.SOURCE, X509Identity.load(src_dir), X509Trust.load(src_dir),
                     peer_host=dialled)
    dst = Connection(Role.DESTINATION, X509Identity.load(dst_dir), dst_trust(dst_dir))
    failure: Exception | None = None
    for a, b in ((src, dst), (dst, src), (src, dst)):
        data = b"".join(bytes(f) for f in a.pop_ready())
        try:
            b.receive_data(data)
        except UnknownPeer as exc:  # the refusing side: its error frame still goes out
            failure = exc
            a.receive_data(b"".join(bytes(f) for f in b.pop_ready()))
            break
    return src.events(), dst.events(), failure  # (each side's events, and who refused)


def test_a_handshake_with_certificates_from_the_ca(tmp_path: pathlib.Path) -> None:
    ca = CA("hv-ca")
    a = host_dir(tmp_path, ca, "hv-a.example", ["hv-a.example", "127.0.0.1"])
    b = host_dir(tmp_path, ca, "hv-b.example", ["hv-b.example", "127.0.0.1"])
    sev, dev, failure = handshake(a, b)
    assert failure is None
    assert isinstance(sev[0], Established) and sev[0].peer_name == "hv-b.example"
    assert isinstance(dev[0], Established) and dev[0].peer_name == "hv-a.example"
    sev, dev, failure = handshake(a, b, dialled="hv-b.example")  # by DNS name too
    assert failure is None and isinstance(sev[0], Established)


@pytest.mark.parametrize("case, why", [
    ("another CA", "no chain to this host's CA"),
    ("expired", "not valid at validation time"),
    ("wrong host name", "no matching subjectAltName"),
    ("revoked", "is revoked"),
    ("client cert as server", "required EKU not found"),
    ("not allowed", "none of its names"),
])
def test_a_peer_that_cannot_prove_its_identity_moves_no_bytes(
        tmp_path: pathlib.Path, case: str, why: str) -> None:
    ca = CA("hv-ca")
    a = host_dir(tmp_path, ca, "hv-a.example", ["127.0.0.1"])
    dialled = "127.0.0.1"

    def trust(d: str) -> X509Trust:
        return X509Trust.load(d, allowed=("*.prod.example",) if case == "not allowed" else ())
    if case == "another CA":
        b = host_dir(tmp_path, CA("rogue-ca"), "hv-b.example", ["127.0.0.1"])
    elif case == "expired":
        old = ca.issue("hv-b.example", ExtendedKeyUsageOID.SERVER_AUTH, ["127.0.0.1"],
                       not_after=NOW - DAY / 2)
        b = host_dir(tmp_path, ca, "hv-b.example", ["127.0.0.1"], server=old)
    elif case == "wrong host name":
        b = host_dir(tmp_path, ca, "hv-b.example", ["hv-b.example"])
        dialled = "hv-c.example"
    elif case == "revoked":
        b = host_dir(tmp_path, ca, "hv-b.example", ["127.0.0.1"])
        a_client = x509.load_pem_x509_certificate(
            (pathlib.Path(a) / FILES["client"]).read_bytes())
        ca.revoked.append(a_client.serial_number)
        (pathlib.Path(b) / FILES["crl"]).write_bytes(ca.crl())
    elif case == "client cert as server":
        as_server = ca.issue("hv-b.example", ExtendedKeyUsageOID.CLIENT_AUTH, ["127.0.0.1"])
        b = host_dir(tmp_path, ca, "hv-b.example", ["127.0.0.1"], server=as_server)
    else:
        b = host_dir(tmp_path, ca, "hv-b.example", ["127.0.0.1"])
    sev, dev, failure = handshake(a, b, dialled, dst_trust=trust)
    assert isinstance(failure, UnknownPeer) and why in failure.message, failure
    assert not any(isinstance(e, Established) for e in sev + dev)
    assert any(isinstance(e, PeerFailed) for e in sev + dev)


def test_files_are_checked_at_start(tmp_path: pathlib.Path) -> None:
    ca = CA("hv-ca")
    d = pathlib.Path(host_dir(tmp_path, ca, "hv-a.example", ["127.0.0.1"]))
    (d / FILES["client-key"]).chmod(0o644)
    with pytest.raises(ConfigError, match="accessible by others"):
        X509Identity.load(str(d))
    (d / FILES["client-key"]).chmod(0o600)
    (d / FILES["ca"]).write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"ca-cert\.pem: not PEM certificates"):
        X509Trust.load(str(d))
    with pytest.raises(ConfigError, match="No such file"):
        X509Trust.load(str(tmp_path / "nowhere"))


def test_two_daemons_migrate_with_their_certificates(tmp_path: pathlib.Path) -> None:
    from migd.harness import start_daemon

    ca = CA("hv-ca")
    wd = str(tmp_path)
    daemons = []
    try:
        for name, ca_ in (("dst", ca), ("src", ca), ("rogue", CA("rogue-ca"))):
            conf = tmp_path / f"{name}.toml"
            conf.write_text(f'x509_dir = "{host_dir(tmp_path, ca_, name, ["127.0.0.1"])}"\n')
            content = ",content=zero" if name == "dst" else ""
            daemons.append(start_daemon(wd, name, [f"vf0:sim:size=4M{content}"], [],
                                        extra=["--config", str(conf)], identity="x509"))
        dst, src, rogue = daemons
        with src.client() as c:
            final = c.migrate_follow({"device": "vf0", "peer": dst.address})
        assert final["status"] == "completed", final.get("error-desc")
        digest = [d.call("device-digest", device="vf0")["sha256"] for d in (dst, src)]
        assert digest[0] == digest[1]
        with rogue.client() as c:
            refused = c.migrate_follow({"device": "vf0", "peer": dst.address})
        assert refused["status"] == "failed"
        assert "no chain to this host's CA" in refused["error-desc"]
        assert len(dst.call("query-migrate")) == 1  # the rogue never got a migration
    finally:
        for d in daemons:
            d.stop()
