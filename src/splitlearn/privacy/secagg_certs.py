"""Secure aggregation bound to the run's certificates (the mutual TLS kit of
:mod:`splitlearn.wire.transport.tls`): a client signs the round's roster with its party key, and
every client checks every other's signature against the run's CA and the roster's name.

A client's keys alone prove nothing: the federation relays them and could put keys of its own under
a real client's name, then read the shares sent to that name. So each client sends its certificate
with its keys, and once the roster is out signs its digest (:meth:`~splitlearn.privacy.secagg.Roster.digest`:
the round's context, the threshold, the samples, every client's keys and certificate); a client shares
its secrets only with the clients whose signature of that very digest checks out (certificate issued by
the CA in ``ca.pem``, for that party name, role ``party``, not expired nor revoked: what
:class:`~splitlearn.wire.transport.tls.PeerCheck` says of a peer at a connection). A signature over
the roster vouches for the signer's own keys in it and for this round: keys of an earlier round, whose
private half the federation may have rebuilt from shares when that client dropped, cannot be passed off
again, as the new roster holds the other clients' fresh keys. Signatures: ECDSA with SHA-256 (EC keys,
what ``splitlearn certs`` and ``splitlearn keys`` make) or RSA-PSS with SHA-256.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ..wire.transport.tls import CertificateError, Credentials, PeerCheck, cert_names
from .secagg import SecAggError

__all__ = ["MAX_CERTIFICATE_BYTES", "MAX_SIGNATURE_BYTES", "Certified"]

MAX_CERTIFICATE_BYTES = 16 * 1024  # a certificate (DER) a client may send with its keys
MAX_SIGNATURE_BYTES = 1024  # an ECDSA signature is about 72 bytes, an RSA-4096 one 512


class Certified:
    """One party's certificate kit for secure aggregation: :meth:`sign` with its own key, :meth:`check` another
    party's certificate and signature. ``certificate``: its own, DER."""

    def __init__(self, credentials: Credentials):
        self.party = credentials.party
        self._key = serialization.load_pem_private_key(credentials.key, password=None)
        self.certificate = x509.load_pem_x509_certificate(credentials.cert).public_bytes(serialization.Encoding.DER)
        self._peers = PeerCheck(credentials)
        self._ca = x509.load_pem_x509_certificate(credentials.ca)
        self._issued: dict[bytes, x509.Certificate] = {}  # DER -> certificates the CA issued (checked once)

    def sign(self, data: bytes) -> bytes:
        key = self._key
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(data, ec.ECDSA(hashes.SHA256()))
        if isinstance(key, rsa.RSAPrivateKey):
            return key.sign(data, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.MAX_LENGTH), hashes.SHA256())
        raise SecAggError(f"{self.party}'s key is neither EC nor RSA: it cannot sign secure aggregation's roster")

    def certificate_of(self, name: str, der: bytes) -> x509.Certificate:
        """``der`` as the certificate of party ``name``: issued by the run's CA, for that name, and
        accepted by :class:`~splitlearn.wire.transport.tls.PeerCheck` now (else SecAggError saying why)."""
        if not der:
            raise SecAggError(f"{name!r} sent no certificate: under mutual TLS every client's keys are signed")
        if len(der) > MAX_CERTIFICATE_BYTES:
            raise SecAggError(f"the certificate of {name!r} has {len(der)} bytes, at most {MAX_CERTIFICATE_BYTES}")
        cert = self._issued.get(der)
        if cert is None:
            try:
                cert = x509.load_der_x509_certificate(der)
                cert.verify_directly_issued_by(self._ca)
            except Exception:  # noqa: BLE001 - unreadable, another issuer, a bad signature, ...
                raise SecAggError(f"the certificate given for {name!r} was not issued by the run's authority "
                                  "(ca.pem)") from None
            self._issued[der] = cert
        if name not in cert_names(cert):
            raise SecAggError(f"the certificate given for {name!r} is for {cert_names(cert)[:3]}")
        try:
            why = self._peers.verdict(cert, name)
        except CertificateError as e:
            raise SecAggError(f"{self.party} cannot check certificates: {e}") from None
        if why:
            raise SecAggError(why)
        return cert

    def check(self, name: str, der: bytes, data: bytes, signature: bytes) -> None:
        """SecAggError unless ``signature`` is party ``name``'s of ``data``, by the certificate ``der``."""
        key = self.certificate_of(name, der).public_key()
        try:
            if len(signature) > MAX_SIGNATURE_BYTES:
                raise InvalidSignature
            if isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
            elif isinstance(key, rsa.RSAPublicKey):
                key.verify(signature, data, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.MAX_LENGTH),
                           hashes.SHA256())
            else:
                raise InvalidSignature
        except InvalidSignature:
            raise SecAggError(f"the signature of {name!r} over the roster does not check out with its "
                              "certificate (another roster, or not its key)") from None
