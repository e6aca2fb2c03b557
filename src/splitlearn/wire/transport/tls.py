"""Certificates for mutual TLS between parties: a private CA and one certificate per party, and what
every party checks of a peer's certificate at each connection.

``make_certs`` writes ``ca.pem``/``ca.key`` and, per party, ``NAME.pem``/``NAME.key``: an EC
P-256 certificate signed by the CA with subject ``CN=NAME`` and ``subjectAltName DNS:NAME``
(gRPC compares the name verbatim, so names with ``_`` such as ``clinic_a`` work as they are).
The listening side of a connection takes the peer's name from the CN of its client
certificate; the dialing side checks the listener's certificate against the CA and the SAN
against the name it expects. Each party needs only ``ca.pem`` and its own pair; ``ca.key``
should be kept offline. That is for trials; a deployment makes each key at its party
(:mod:`.authority`: ``splitlearn keys``, ``sign``, ``revoke``).

Beyond TLS, :class:`PeerCheck` refuses a peer whose certificate expired, is on the revocation list of
the party's folder (``crl.pem``, read again whenever it changes) or carries another role than
``party`` (the subject's OU), with a message naming the peer and why; the listening side reads the
peer's certificate from the gRPC auth context, the dialing side from a TLS connection of its own to
the listener (:meth:`PeerCheck.dialed`). :func:`load_credentials` refuses to start a party whose own
certificate expired or was revoked, and warns when it expires within a week.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

UNREACHED = "no TLS answer: its certificate could not be checked"  # (compared by identity)

__all__ = ["Credentials", "CertificateError", "PeerCheck", "ROLES", "WARN_DAYS", "UNREACHED", "cert_role", "cert_names",
           "check_party_name",
           "issue", "key_pem", "load_credentials", "make_certs", "new_authority", "private_folder", "utc",
           "write_pem"]

log = logging.getLogger("splitlearn.wire.transport.tls")

_HINT = ("make them with `splitlearn certs PLAN --out DIR` (a trial), or on each party's machine with "
         "`splitlearn keys` and the authority's `splitlearn sign` (a deployment)")
_RENEW = "make a new request (splitlearn keys) and have the authority sign it (splitlearn sign)"
ROLES = ("party", "admin")  # what a certificate may carry in its subject's OU
WARN_DAYS = 7  # a party warns at start when its own certificate expires within this many days


class CertificateError(ValueError):
    """A certificate, key, request, ledger or revocation list that cannot be used: which file, and what to do."""


@dataclass(frozen=True)
class Credentials:
    """PEM bytes for one party: the CA to trust, and its own certificate and private key; ``folder``
    (where :func:`load_credentials` read them) holds the revocation list ``crl.pem`` too, when there is one."""

    ca: bytes
    cert: bytes
    key: bytes
    party: str
    folder: Path | None = None

    def __repr__(self) -> str:  # never print the key
        return f"Credentials(party={self.party!r})"


def check_party_name(name: str) -> None:
    """Refuse names that cannot be a certificate name or a file name of a certificate folder."""
    if (not name or not name.isascii() or not name.isprintable() or any(c.isspace() for c in name)
            or any(c in name for c in "/\\*") or name in (".", "..", "ca", "crl")):
        raise ValueError(f"party name {name!r} cannot be used in a certificate: it must be non-empty printable "
                         "ASCII without whitespace, '/', '\\' or '*' (and not 'ca' or 'crl')")


def utc(t: dt.datetime) -> str:
    """A certificate's time as messages show it: ``2025-03-01 12:00 UTC``."""
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def cert_role(cert: x509.Certificate) -> str:
    """The role a certificate carries in its subject's OU: ``party`` where it carries none (:func:`make_certs`')."""
    ous = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    return ",".join(ous) or "party"


def cert_names(cert: x509.Certificate) -> list[str]:
    """The names a certificate is for: its SAN's DNS names, else its CN."""
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
    except x509.ExtensionNotFound:
        return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def write_pem(path: Path, data: bytes, private: bool = False) -> None:
    """Write ``data`` to ``path``; ``private``: mode 0600 (also over an existing file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        if private:
            os.fchmod(f.fileno(), 0o600)  # also when the file already existed
        f.write(data)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A private key as unencrypted PKCS#8 PEM (the file is what protects it: mode 0600)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
def new_authority(days: int, cn: str = "splitlearn CA") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate valid ``days`` days (from 5 minutes ago: clocks differ) and its key."""
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def issue(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, public_key: CertificatePublicKeyTypes,
          name: str, days: float, role: str | None = None) -> x509.Certificate:
    """A certificate for party ``name`` (CN and SAN; ``role`` in the OU when given) on ``public_key``,
    signed by the CA, valid ``days`` days from 5 minutes ago (0: already expired), with a random serial."""
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
    if role is not None:
        subject.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (x509.CertificateBuilder().subject_name(x509.Name(subject)).issuer_name(ca.subject)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(ca_key, hashes.SHA256()))


def make_certs(parties: list[str], out: Path, days: int = 365) -> None:
    """Write a new CA and a certificate/key pair for every party to the folder ``out`` (a trial's:
    every key in one place; a deployment makes them at home, :mod:`.authority`)."""
    for p in parties:
        check_party_name(p)
    if len({p.lower() for p in parties}) != len(parties):
        raise ValueError(f"party names must differ (ignoring case, as certificate names do): {parties}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ca, ca_key = new_authority(days)
    write_pem(out / "ca.key", key_pem(ca_key), private=True)
    write_pem(out / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))
    for party in parties:
        key = ec.generate_private_key(ec.SECP256R1())
        write_pem(out / f"{party}.key", key_pem(key), private=True)
        write_pem(out / f"{party}.pem", issue(ca, ca_key, key.public_key(), party, days)
                  .public_bytes(serialization.Encoding.PEM))


def load_credentials(certs_dir: Path, party: str) -> Credentials:
    """Read ``ca.pem``, ``PARTY.pem`` and ``PARTY.key`` from ``certs_dir`` and check that they fit
    together: the certificate names ``party``, is signed by the CA and matches the key; it must not
    have expired nor be on the folder's revocation list (``crl.pem``, when there is one), and a
    warning is logged when it expires within :data:`WARN_DAYS` days."""
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
    creds = Credentials(blobs["ca.pem"], blobs[f"{party}.pem"], blobs[f"{party}.key"], party, certs_dir)
    refused = PeerCheck(creds).verdict(cert, party)  # a crl.pem that cannot be read is a CertificateError here
    if refused:
        raise CertificateError(f"party {party!r} cannot start: {refused} ({certs_dir / (party + '.pem')}); {_RENEW}")
    left = cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    if left < dt.timedelta(days=WARN_DAYS):
        log.warning("the certificate of %r (%s) expires on %s, in %.1f days: %s", party, certs_dir / f"{party}.pem",
                    utc(cert.not_valid_after_utc), left / dt.timedelta(days=1), _RENEW)
    return creds


class PeerCheck:
    """What a party checks of a peer's certificate at each new connection, beyond TLS (which checks the
    CA's signature, and the name on the dialing side): the role ``party``, not expired, and not on the
    revocation list ``crl.pem`` of the party's certificate folder, read again whenever the file changes
    (a list that cannot be read, or is not the authority's, refuses every peer until it is replaced)."""

    def __init__(self, credentials: Credentials):
        self.credentials = credentials
        self.ca = x509.load_pem_x509_certificate(credentials.ca)
        self.crl = None if credentials.folder is None else Path(credentials.folder) / "crl.pem"
        self._lock = threading.Lock()
        self._stamp: tuple | None = None  # the crl.pem read last: (inode, size, mtime)
        self._revoked: dict[int, dt.datetime] = {}
        self._ssl: ssl.SSLContext | None = None

    def revoked(self) -> dict[int, dt.datetime]:
        """Serial -> revocation time of the certificates the folder's ``crl.pem`` lists ({} without one);
        CertificateError when the file cannot be read or is not signed by the authority in ``ca.pem``."""
        if self.crl is None:
            return {}
        with self._lock:
            try:
                st = self.crl.stat()
            except FileNotFoundError:
                self._stamp, self._revoked = None, {}
                return {}
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            if stamp != self._stamp:
                self._stamp, self._revoked = None, {}  # until it reads as a valid list
                try:
                    crl = x509.load_pem_x509_crl(self.crl.read_bytes())
                except (OSError, ValueError) as e:
                    raise CertificateError(f"the revocation list {self.crl} cannot be read ({e}): ask the authority "
                                           "for its crl.pem (splitlearn revoke writes it)") from None
                if crl.issuer != self.ca.subject or not crl.is_signature_valid(self.ca.public_key()):
                    raise CertificateError(f"the revocation list {self.crl} is not signed by the authority in "
                                           f"{self.crl.parent / 'ca.pem'}: ask the authority for its crl.pem")
                self._revoked = {r.serial_number: r.revocation_date_utc for r in crl}
                self._stamp = stamp
            return dict(self._revoked)

    def verdict(self, cert: x509.Certificate, name: str, role: str = "party") -> str | None:
        """Why ``name``'s certificate ``cert`` is refused for ``role`` (its role, its validity, the revocation
        list), or None. CertificateError when the revocation list cannot be read."""
        if cert_role(cert) != role:
            return (f"certificate of {name!r} is for the role {cert_role(cert)!r}, not "
                    f"{'a party' if role == 'party' else 'an administrator'}'s")
        gone = self.revoked().get(cert.serial_number)
        if gone is not None:
            return f"certificate of {name!r} was revoked on {utc(gone)}"
        now = dt.datetime.now(dt.timezone.utc)
        if now > cert.not_valid_after_utc:
            return f"certificate of {name!r} expired on {utc(cert.not_valid_after_utc)}"
        if now < cert.not_valid_before_utc:
            return (f"certificate of {name!r} is valid only from {utc(cert.not_valid_before_utc)} "
                    "(is a clock wrong?)")
        return None

    def accepted(self, context, name: str) -> str | None:
        """Why party ``name``, which dialed in on the gRPC call ``context`` (its certificate in the call's auth
        context), is refused, or None."""
        pem = (context.auth_context().get("x509_pem_cert") or [b""])[0]
        try:
            return self.verdict(x509.load_pem_x509_certificate(pem), name)
        except CertificateError as e:
            return f"this party cannot check certificates: {e}"
        except ValueError:
            return f"the certificate of {name!r} cannot be read"

    def dialed(self, address: str, name: str, timeout: float = 2.0) -> str | None:
        """Why the party listening at ``address`` is refused as ``name``, from the certificate it presents to a
        TLS connection of this party's own (gRPC does not show a client the listener's certificate): not the
        authority's, for another name, or refused by :meth:`verdict`. None when it passes, and without the folder
        (this party's own pair is presented); :data:`UNREACHED` when no TLS answer came: not checked, so no
        stream may be opened yet (the dialer tries again)."""
        folder, me = self.credentials.folder, self.credentials.party
        if folder is None:
            return None
        why = self._dialed(address, name, timeout)
        if why is not None and why is not UNREACHED:
            log.warning("%s: refused to connect to %s at %s: %s", me, name, address, why)
        return why

    def _dialed(self, address: str, name: str, timeout: float) -> str | None:
        folder, me = self.credentials.folder, self.credentials.party
        host, _, port = address.rpartition(":")
        try:
            if self._ssl is None:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # checked below, with the reasons
                ctx.set_alpn_protocols(["h2"])
                ctx.load_cert_chain(Path(folder) / f"{me}.pem", Path(folder) / f"{me}.key")
                self._ssl = ctx
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock, \
                    self._ssl.wrap_socket(sock) as tls:
                der = tls.getpeercert(binary_form=True)
            cert = x509.load_der_x509_certificate(der)
        except (OSError, ValueError, TypeError):  # not reachable yet, or no TLS there: not checked
            return UNREACHED
        try:
            cert.verify_directly_issued_by(self.ca)
        except Exception:  # noqa: BLE001 - InvalidSignature, another issuer, ...
            return f"the party at {address} presents a certificate that the authority in ca.pem did not issue"
        if name not in cert_names(cert):
            return f"the party at {address} presents a certificate for {cert_names(cert)}, not for {name!r}"
        try:
            return self.verdict(cert, name)
        except CertificateError as e:
            return f"this party cannot check certificates: {e}"


@contextmanager
def private_folder(path: Path) -> Iterator[str]:
    """A folder only this user may enter (mode 0700) for throw-away keys, at ``path`` (a run folder's
    ``.certs``: never a shared temporary folder, where a killed run would leave them): what an earlier,
    killed run left there is removed first, and the folder on the way out."""
    path = Path(path)

    def remove() -> None:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)

    remove()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode=0o700)
    os.chmod(path, 0o700)  # whatever the umask
    try:
        yield str(path)
    finally:
        remove()
