"""Certificates for mutual TLS between parties: a private CA and one certificate per party.

``make_certs`` writes ``ca.pem``/``ca.key`` and, per party, ``NAME.pem``/``NAME.key``: an EC
P-256 certificate signed by the CA with subject ``CN=NAME`` and ``subjectAltName DNS:NAME``
(gRPC compares the name verbatim, so names with ``_`` such as ``clinic_a`` work as they are).
The listening side of a connection takes the peer's name from the CN of its client
certificate; the dialing side checks the listener's certificate against the CA and the SAN
against the name it expects. Each party needs only ``ca.pem`` and its own pair; ``ca.key``
should be kept offline.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Credentials", "check_party_name", "load_credentials", "make_certs"]

_HINT = "make them with `splitlearn certs PLAN --out DIR`"


@dataclass(frozen=True)
class Credentials:
    """PEM bytes for one party: the CA to trust, and its own certificate and private key."""

    ca: bytes
    cert: bytes
    key: bytes
    party: str

    def __repr__(self) -> str:  # never print the key
        return f"Credentials(party={self.party!r})"


def check_party_name(name: str) -> None:
    """Refuse names that cannot be a certificate name or a file name."""
    if (not name or not name.isascii() or not name.isprintable() or any(c.isspace() for c in name)
            or any(c in name for c in "/\\*") or name in (".", "..", "ca")):
        raise ValueError(f"party name {name!r} cannot be used in a certificate: it must be non-empty printable "
                         "ASCII without whitespace, '/', '\\' or '*' (and not 'ca')")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, data: bytes, private: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        if private:
            os.fchmod(f.fileno(), 0o600)  # also when the file already existed
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_certs(parties: list[str], out: Path, days: int = 365) -> None:
    """Write a new CA and a certificate/key pair for every party to the folder ``out``."""
    for p in parties:
        check_party_name(p)
    if len({p.lower() for p in parties}) != len(parties):
        raise ValueError(f"party names must differ (ignoring case, as certificate names do): {parties}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate some clock skew
    until = now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("splitlearn CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    _write(out / "ca.key", _key_pem(ca_key), private=True)
    _write(out / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    for party in parties:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(party)).issuer_name(ca_name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now).not_valid_after(until)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                             crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(party)]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
                .sign(ca_key, hashes.SHA256()))
        _write(out / f"{party}.key", _key_pem(key), private=True)
        _write(out / f"{party}.pem", cert.public_bytes(serialization.Encoding.PEM))


def load_credentials(certs_dir: Path, party: str) -> Credentials:
    """Read ``ca.pem``, ``PARTY.pem`` and ``PARTY.key`` from ``certs_dir`` and check that they fit
    together: the certificate names ``party``, is signed by the CA and matches the key."""
    check_party_name(party)
    certs_dir = Path(certs_dir)
    blobs = {}
    for name in ("ca.pem", f"{party}.pem", f"{party}.key"):
        path = certs_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: party {party!r} needs ca.pem, {party}.pem and {party}.key "
                                    f"in {certs_dir}; {_HINT}")
        blobs[name] = path.read_bytes()
    try:
        ca = x509.load_pem_x509_certificate(blobs["ca.pem"])
        cert = x509.load_pem_x509_certificate(blobs[f"{party}.pem"])
        key = serialization.load_pem_private_key(blobs[f"{party}.key"], password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"cannot read the certificates in {certs_dir} for {party!r}: {e}; {_HINT}") from None
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != [party]:
        raise ValueError(f"{certs_dir / (party + '.pem')} is a certificate for {cns}, not for party {party!r}")
    try:
        cert.verify_directly_issued_by(ca)
    except Exception as e:  # noqa: BLE001 - InvalidSignature, wrong key type, ...
        raise ValueError(f"{party}.pem was not issued by the CA in {certs_dir / 'ca.pem'} "
                         f"({type(e).__name__}); {_HINT}") from None
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
            != cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ValueError(f"{party}.key does not belong to {party}.pem in {certs_dir}")
    return Credentials(blobs["ca.pem"], blobs[f"{party}.pem"], blobs[f"{party}.key"], party)
