"""The consortium's authority, and keys that stay home: what ``splitlearn authority``, ``keys``,
``sign``, ``revoke`` and ``provision`` do with files.

* :func:`make_authority`: the authority's folder: ``ca.key`` (mode 0600, the folder 0700: keep it
  offline), ``ca.pem``, the ledger ``ledger.json`` of every certificate signed, and ``crl.pem``, the
  revocation list it signs (empty at first);
* :func:`make_request`: on a party's own machine, its private key ``NAME.key`` (0600; it never leaves)
  and a certificate signing request ``NAME.csr`` carrying its name (CN) and role (OU: ``party`` or
  ``admin``);
* :func:`sign_requests`: the authority checks each request (its signature, a valid party name and
  role, no certificate of that name signed and in force under another key) and writes ``NAME.pem``:
  CN and SAN ``NAME`` (what gRPC checks on either side, as :func:`~.tls.make_certs`' certificates),
  the role in the OU, an expiry; its serial goes to the ledger;
* :func:`revoke`: every certificate of a name goes on the revocation list ``crl.pem``, which the
  authority sends to every party's certificate folder (parties read it at each new connection:
  :class:`~.tls.PeerCheck`);
* :func:`write_kit`: one party's folder to send it: the plan, ``ca.pem``, ``crl.pem``, its signed
  certificate when there is one, ``start.sh`` and a ``README.txt``; never a key.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

from .tls import (ROLES, CertificateError, cert_role, check_party_name, issue, key_pem, new_authority, utc,
                  write_pem)

__all__ = ["LEDGER", "Issued", "make_authority", "make_request", "sign_requests", "revoke", "write_kit"]

LEDGER = "ledger.json"  # in the authority's folder: every certificate signed (serial, name, role, key, expiry, revoked)
_FORMAT = 1
_NOT_AUTHORITY = "make one with `splitlearn authority --out DIR` and give that folder as --ca"


@dataclass(frozen=True)
class Issued:
    """A certificate the authority signed: for whom, its serial (the ledger's and a revocation's), until when, where."""

    name: str
    role: str
    serial: int
    not_after: dt.datetime
    path: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _key_id(public_key: CertificatePublicKeyTypes) -> str:
    """SHA-256 of a public key (SubjectPublicKeyInfo DER): which key a certificate was signed for."""
    return hashlib.sha256(public_key.public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def _save_ledger(ca_dir: Path, ledger: dict) -> None:
    tmp = ca_dir / f".{LEDGER}.tmp"
    write_pem(tmp, json.dumps(ledger, indent=1).encode(), private=True)
    os.replace(tmp, ca_dir / LEDGER)


def _load_ledger(path: Path) -> dict:
    """The ledger, its shape checked: CertificateError naming the file otherwise."""
    try:
        ledger = json.loads(path.read_text())
        ok = (isinstance(ledger, dict) and ledger.get("format") == _FORMAT and isinstance(ledger.get("crl_number"), int)
              and isinstance(ledger.get("certificates"), list)
              and all(isinstance(e, dict) and all(isinstance(e.get(k), str) for k in
                                                  ("serial", "name", "role", "key", "not_after", "signed"))
                      and e["serial"].isdigit() and isinstance(e.get("revoked"), (str, type(None)))
                      for e in ledger["certificates"]))
        if ok:
            for e in ledger["certificates"]:
                for k in ("not_after", "revoked"):
                    if e[k] is not None:
                        dt.datetime.fromisoformat(e[k])
    except (OSError, ValueError) as e:
        raise CertificateError(f"{path} cannot be read ({e}): restore it from a backup of the authority's folder") \
            from None
    if not ok:
        raise CertificateError(f"{path} is not a ledger of `splitlearn authority` (format {_FORMAT}): restore it "
                               "from a backup of the authority's folder")
    return ledger


def _open_authority(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, dict]:
    ca_dir = Path(ca_dir)
    missing = [f for f in ("ca.pem", "ca.key", LEDGER) if not (ca_dir / f).is_file()]
    if missing:
        raise CertificateError(f"{ca_dir} holds no authority: {', '.join(missing)} missing; {_NOT_AUTHORITY}")
    try:
        ca = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    except ValueError as e:
        raise CertificateError(f"cannot read the authority in {ca_dir} ({e}); {_NOT_AUTHORITY}") from None
    if _key_id(key.public_key()) != _key_id(ca.public_key()):
        raise CertificateError(f"{ca_dir / 'ca.key'} does not belong to {ca_dir / 'ca.pem'}")
    return ca, key, _load_ledger(ca_dir / LEDGER)


def _write_crl(ca_dir: Path, ca: x509.Certificate, key: ec.EllipticCurvePrivateKey, ledger: dict) -> None:
    """``crl.pem``: every revoked certificate of the ledger, signed by the authority."""
    now = _now()
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject).last_update(now)
         .next_update(now + dt.timedelta(days=365)).add_extension(x509.CRLNumber(ledger["crl_number"]), critical=False))
    for e in ledger["certificates"]:
        if e["revoked"] is not None:
            b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(int(e["serial"]))
                                          .revocation_date(dt.datetime.fromisoformat(e["revoked"])).build())
    write_pem(ca_dir / "crl.pem", b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def make_authority(out: Path, days: int = 3650) -> Path:
    """A new authority in the folder ``out`` (made 0700): ``ca.key`` (0600), ``ca.pem`` valid ``days``
    days, an empty ledger and revocation list; ``ca.pem``'s path. Refused where ``out`` already holds one."""
    out = Path(out)
    if (out / "ca.key").exists() or (out / LEDGER).exists():
        raise CertificateError(f"{out} already holds an authority (ca.key, {LEDGER}): a new one would make every "
                               "certificate it signed useless; give another --out")
    if not isinstance(days, int) or days < 1:
        raise CertificateError(f"the authority's validity must be a whole number of days >= 1, not {days!r}")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(out, 0o700)
    ca, key = new_authority(days, "splitlearn authority")
    write_pem(out / "ca.key", key_pem(key), private=True)
    write_pem(out / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))
    ledger = {"format": _FORMAT, "crl_number": 0, "certificates": []}
    _save_ledger(out, ledger)
    _write_crl(out, ca, key, ledger)
    return out / "ca.pem"


def make_request(name: str, out: Path, role: str = "party") -> Path:
    """On party ``name``'s own machine: a new private key ``out/NAME.key`` (0600, it never leaves) and a
    signing request ``out/NAME.csr`` (CN ``name``, OU ``role``) to send to the authority; the request's
    path. Refused where ``out`` already holds ``NAME.key`` (the certificate signed for it would be orphaned)."""
    try:
        check_party_name(name)
    except ValueError as e:
        raise CertificateError(str(e)) from None
    if role not in ROLES:
        raise CertificateError(f"role {role!r}: a certificate is for one of {', '.join(ROLES)}")
    out = Path(out)
    if (out / f"{name}.key").exists():
        raise CertificateError(f"{out / (name + '.key')} exists: a new key would orphan the certificate signed for it; "
                               "remove it first (and have the authority revoke its certificate) to make a new one")
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)])
    csr = (x509.CertificateSigningRequestBuilder().subject_name(subject)
           .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
           .sign(key, hashes.SHA256()))
    write_pem(out / f"{name}.key", key_pem(key), private=True)
    write_pem(out / f"{name}.csr", csr.public_bytes(serialization.Encoding.PEM))
    return out / f"{name}.csr"


def _read_request(path: Path) -> tuple[str, str, CertificatePublicKeyTypes]:
    """(name, role, public key) of a signing request, every part checked; CertificateError naming the file."""
    path = Path(path)
    try:
        csr = x509.load_pem_x509_csr(path.read_bytes())
    except (OSError, ValueError) as e:
        raise CertificateError(f"{path} is not a certificate signing request ({e}); the party makes it with "
                               "`splitlearn keys --name NAME --out DIR`") from None
    if not csr.is_signature_valid:
        raise CertificateError(f"{path}: the request's signature does not match its key (altered on the way?); "
                               "ask the party for it again")
    cns = [str(a.value) for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if len(cns) != 1:
        raise CertificateError(f"{path} names {cns or 'no party'}: a request names exactly one party (its CN)")
    try:
        check_party_name(cns[0])
    except ValueError as e:
        raise CertificateError(f"{path}: {e}") from None
    ous = [str(a.value) for a in csr.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    if len(ous) > 1 or (ous and ous[0] not in ROLES):
        raise CertificateError(f"{path} asks for the role {','.join(ous)!r}: a certificate is for one of "
                               f"{', '.join(ROLES)}")
    key = csr.public_key()
    if not (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in ("secp256r1", "secp384r1")
            or isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048):
        raise CertificateError(f"{path}: its key is not one the parties accept (EC P-256 or P-384, RSA of 2048 bits "
                               "or more); make the request with `splitlearn keys`")
    return cns[0], ous[0] if ous else "party", key


def sign_requests(requests: list[Path], ca_dir: Path, days: int = 365, out: Path | None = None) -> list[Issued]:
    """The authority in ``ca_dir`` signs each request (from :func:`make_request`): ``NAME.pem`` in ``out``
    (default: next to the request), valid ``days`` days (0: already expired, for trials of refusals),
    recorded in the ledger. Every request is checked before any is signed: a request that cannot be
    read, a name no party can have, or a name whose certificate is in force (signed, not revoked, not
    expired) under another key is refused (CertificateError naming the file)."""
    ca_dir = Path(ca_dir)
    ca, ca_key, ledger = _open_authority(ca_dir)
    if not isinstance(days, int) or days < 0:
        raise CertificateError(f"--days must be a whole number of days >= 0, not {days!r}")
    now = _now()
    if now > ca.not_valid_after_utc:
        raise CertificateError(f"the authority's certificate {ca_dir / 'ca.pem'} expired on "
                               f"{utc(ca.not_valid_after_utc)}: a new authority must sign every party again")
    if now + dt.timedelta(days=days) > ca.not_valid_after_utc:
        raise CertificateError(f"--days {days} goes past the authority's own expiry ({utc(ca.not_valid_after_utc)}): "
                               f"give at most {(ca.not_valid_after_utc - now).days}")
    held: dict[str, tuple[str, str]] = {}  # name (any case) -> (key id, where): in force now
    for e in ledger["certificates"]:
        if e["revoked"] is None and dt.datetime.fromisoformat(e["not_after"]) > now:
            held.setdefault(e["name"].lower(), (e["key"], f"serial {int(e['serial']):#x} in {ca_dir / LEDGER}"))
    todo = []
    for path in requests:
        name, role, key = _read_request(path)
        kid, (had, where) = _key_id(key), held.get(name.lower(), (None, ""))
        if had is not None and had != kid:
            raise CertificateError(f"{path}: {name!r} already has a certificate in force under another key ({where}); "
                                   f"revoke it first (splitlearn revoke {name} --ca {ca_dir}) if this key replaces it")
        held[name.lower()] = (kid, str(path))
        todo.append((Path(path), name, role, key, kid))
    issued, files = [], []
    for path, name, role, key, kid in todo:
        cert = issue(ca, ca_key, key, name, days, role)
        target = (Path(out) if out is not None else path.parent) / f"{name}.pem"
        ledger["certificates"].append({"serial": str(cert.serial_number), "name": name, "role": role, "key": kid,
                                       "not_after": cert.not_valid_after_utc.isoformat(), "signed": now.isoformat(),
                                       "revoked": None})
        issued.append(Issued(name, role, cert.serial_number, cert.not_valid_after_utc, target))
        files.append((target, cert.public_bytes(serialization.Encoding.PEM)))
    _save_ledger(ca_dir, ledger)  # recorded before delivered: every certificate out there can be revoked
    for target, pem in files:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_pem(target, pem)
    return issued


def revoke(name: str, ca_dir: Path) -> list[int]:
    """Put every certificate of ``name`` not revoked yet on the authority's revocation list (``crl.pem``,
    written again and signed); their serials ([] when all were revoked already). CertificateError when
    the authority signed none for ``name``."""
    ca_dir = Path(ca_dir)
    ca, key, ledger = _open_authority(ca_dir)
    entries = [e for e in ledger["certificates"] if e["name"] == name]
    if not entries:
        signed = sorted({e["name"] for e in ledger["certificates"]})
        raise CertificateError(f"the authority in {ca_dir} signed no certificate for {name!r} "
                               f"(it signed for: {', '.join(signed[:20]) or 'nobody yet'})")
    now = _now().replace(microsecond=0).isoformat()
    fresh = [e for e in entries if e["revoked"] is None]
    for e in fresh:
        e["revoked"] = now
    ledger["crl_number"] += 1
    _save_ledger(ca_dir, ledger)
    _write_crl(ca_dir, ca, key, ledger)
    return [int(e["serial"]) for e in fresh]


def write_kit(folder: Path, name: str, plan_file: Path, ca_dir: Path, signed: Path | None, script: str,
              readme: Callable[[bool], str]) -> bool:
    """Party ``name``'s kit in ``folder``: the plan file, the authority's ``ca.pem`` and current ``crl.pem``,
    ``start.sh`` (``script``, executable), ``README.txt`` (``readme(whether the certificate is there)``) and,
    when ``signed`` (a folder) holds ``NAME.pem``, that certificate, checked: the authority's, for ``name``
    and a party, in force. Never a key. Whether the certificate is in the kit."""
    ca_dir, folder = Path(ca_dir), Path(folder)
    ca, _, ledger = _open_authority(ca_dir)
    cert_file = None if signed is None else Path(signed) / f"{name}.pem"
    if cert_file is not None and cert_file.is_file():
        try:
            cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
            cert.verify_directly_issued_by(ca)
        except Exception as e:  # noqa: BLE001 - unreadable, InvalidSignature, another issuer
            raise CertificateError(f"{cert_file} is not a certificate of the authority in {ca_dir} "
                                   f"({type(e).__name__}): sign the party's request with `splitlearn sign`") from None
        cns = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        gone = [e["revoked"] for e in ledger["certificates"] if e["serial"] == str(cert.serial_number) and e["revoked"]]
        why = (f"it is for {cns}" if cns != [name] else f"it is for the role {cert_role(cert)!r}"
               if cert_role(cert) != "party" else f"it was revoked on {utc(dt.datetime.fromisoformat(gone[0]))}" if gone
               else f"it expired on {utc(cert.not_valid_after_utc)}" if _now() > cert.not_valid_after_utc else None)
        if why:
            raise CertificateError(f"{cert_file} cannot go into the kit of {name!r}: {why}; sign a new request "
                                   "of the party (splitlearn sign)")
    else:
        cert_file = None
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(plan_file, folder / Path(plan_file).name)
    for f in ("ca.pem", "crl.pem"):
        shutil.copyfile(ca_dir / f, folder / f)
    if cert_file is not None:
        shutil.copyfile(cert_file, folder / f"{name}.pem")
    (folder / "README.txt").write_text(readme(cert_file is not None))
    (folder / "start.sh").write_text(script)
    os.chmod(folder / "start.sh", 0o755)
    return cert_file is not None
