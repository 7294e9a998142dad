"""This device's identity: an Ed25519 key, a self-signed certificate, the device ID.

Invariants:

- The device ID is a function of the public key alone (SHA-256 of the
  SubjectPublicKeyInfo DER), so no other key can claim it, and it survives
  reissuing the certificate. Losing ``key.pem`` loses the ID for good.
- The ID's printed form carries four Luhn mod-32 check characters, so a
  mistyped ID is refused instead of silently naming some other device.
- ``identity/`` is 0700 and both files 0600, created that way (never chmod-ed
  after the fact, so no window where the key is readable). On load, a file
  or directory open to group or others is refused, not repaired: someone may
  already have copied the key, and the user should know.
- Files are written to a temporary name and renamed, so a crash never leaves
  a half-written key.

Format of the ID (as Syncthing's): base32 (RFC 4648, no padding) of the
32-byte hash gives 52 characters; each quarter of 13 gets one check
character (``luhn32``), giving 56; they are printed in 8 dash-separated
groups of 7.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p2pstore.errors import IdentityError, InvalidDeviceId

log = logging.getLogger(__name__)

IDENTITY_DIR = "identity"
KEY_FILE = "key.pem"
CERT_FILE = "cert.pem"

LUHN_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
#: Characters people type for base32 look-alikes (Syncthing accepts the same).
_LOOKALIKES = str.maketrans({"0": "O", "1": "I", "8": "B"})
_GROUPS = 4
_GROUP_LEN = 13
ID_CHARS = _GROUPS * (_GROUP_LEN + 1)  # 56
#: Pinning makes validity dates meaningless; these keep devices with a wrong
#: clock (no RTC, reset to 1970) from failing the TLS chain check.
_NOT_BEFORE = datetime.datetime(1970, 1, 2, tzinfo=datetime.timezone.utc)
_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)


def luhn32(text: str) -> str:
    """The check character for ``text`` (base32 alphabet), as Syncthing computes it.

    Not textbook Luhn: the doubling factor starts at 1 on the leftmost
    character. Kept identical to Syncthing's so its published vectors apply.
    """
    factor = 1
    total = 0
    n = len(LUHN_ALPHABET)
    for char in text:
        codepoint = LUHN_ALPHABET.find(char)
        if codepoint < 0:
            raise InvalidDeviceId(f"character {char!r} can't appear in a device ID")
        addend = factor * codepoint
        factor = 1 if factor == 2 else 2
        total += addend // n + addend % n
    return LUHN_ALPHABET[(n - total % n) % n]


def device_id_from_key_hash(digest: bytes) -> str:
    """Printable device ID for a 32-byte SHA-256 key hash."""
    if len(digest) != 32:
        raise ValueError("a device ID is made from a 32-byte SHA-256 digest")
    plain = base64.b32encode(digest).decode("ascii").rstrip("=")
    groups = [plain[i : i + _GROUP_LEN] for i in range(0, len(plain), _GROUP_LEN)]
    with_checks = "".join(g + luhn32(g) for g in groups)
    return "-".join(with_checks[i : i + 7] for i in range(0, len(with_checks), 7))


def key_hash(public_key_spki_der: bytes) -> bytes:
    """SHA-256 of a SubjectPublicKeyInfo: the raw form of a device ID."""
    return hashlib.sha256(public_key_spki_der).digest()


def device_id_from_cert_der(der: bytes) -> str:
    """Device ID of whoever holds the key in this certificate.

    Raises ``IdentityError`` on bytes that aren't a certificate: callers feed
    it what a peer sent.
    """
    try:
        cert = x509.load_der_x509_certificate(der)
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise IdentityError(f"not a usable certificate: {exc}") from exc
    return device_id_from_key_hash(key_hash(spki))


def normalize_device_id(text: str) -> str:
    """Canonical form of a typed device ID, or ``InvalidDeviceId``.

    Accepts lower case, missing or misplaced dashes, spaces, and the
    look-alikes 0/1/8 for O/I/B.
    """
    if not isinstance(text, str):
        raise InvalidDeviceId("a device ID is a string")
    plain = "".join(text.split()).replace("-", "").upper().translate(_LOOKALIKES)
    if len(plain) != ID_CHARS:
        raise InvalidDeviceId(
            f"a device ID has {ID_CHARS} characters (not counting dashes); got {len(plain)}",
            data={"device_id": text[:100]},
        )
    bad = sorted({c for c in plain if c not in LUHN_ALPHABET})
    if bad:
        raise InvalidDeviceId(
            f"characters {''.join(bad)!r} can't appear in a device ID", data={"device_id": text[:100]}
        )
    for i in range(_GROUPS):
        group = plain[i * (_GROUP_LEN + 1) : (i + 1) * (_GROUP_LEN + 1)]
        if luhn32(group[:-1]) != group[-1]:
            raise InvalidDeviceId(
                "check character wrong: the ID was probably mistyped", data={"device_id": text[:100]}
            )
    return "-".join(plain[i : i + 7] for i in range(0, ID_CHARS, 7))


def key_hash_from_device_id(device_id: str) -> bytes:
    """The 32-byte key hash a (valid) device ID encodes."""
    plain = normalize_device_id(device_id).replace("-", "")
    data = "".join(plain[i * 14 : i * 14 + 13] for i in range(_GROUPS))
    return base64.b32decode(data + "====")


@dataclass(frozen=True, slots=True)
class Identity:
    """This device's key material and ID. Built by ``load_or_create``."""

    device_id: str
    name: str
    cert_path: Path
    key_path: Path
    cert_der: bytes

    @classmethod
    def load_or_create(cls, data_dir: Path, name: str) -> Identity:
        """Load ``<data_dir>/identity/``, creating it on first start.

        A key without a certificate gets a new certificate (same ID); a
        certificate without its key is an error, since making a new key
        would silently change the device ID every peer trusts.
        """
        data_dir = Path(data_dir)
        folder = data_dir / IDENTITY_DIR
        key_path = folder / KEY_FILE
        cert_path = folder / CERT_FILE
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            pass
        _check_private(folder, "700")

        if not key_path.exists():
            if cert_path.exists():
                raise IdentityError(
                    f"{cert_path} exists but its key {key_path} is missing; restore the key from a "
                    f"backup, or delete {cert_path} to create a new identity (a new device ID that "
                    "peers must trust again)",
                    data={"path": str(key_path)},
                )
            key = ed25519.Ed25519PrivateKey.generate()
            _write_private(
                key_path,
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                ),
            )
            log.info("created a new device key in %s", key_path)
        key = _load_key(key_path)
        device_id = device_id_from_key_hash(key_hash(_spki(key.public_key())))

        if not cert_path.exists():
            _write_private(cert_path, _make_cert(key, device_id).public_bytes(serialization.Encoding.PEM))
            log.info("created a self-signed certificate for device %s in %s", device_id, cert_path)
        cert = _load_cert(cert_path)
        if _spki(cert.public_key()) != _spki(key.public_key()):
            raise IdentityError(
                f"{cert_path} does not belong to the key in {key_path}; delete {cert_path} and restart "
                "to issue a matching one (the device ID stays the same)",
                data={"path": str(cert_path)},
            )
        return cls(
            device_id=device_id,
            name=name,
            cert_path=cert_path,
            key_path=key_path,
            cert_der=cert.public_bytes(serialization.Encoding.DER),
        )


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_private(path: Path, fix_mode: str) -> None:
    """Refuse a file or directory that group or others can use."""
    try:
        st = path.stat()
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror}", data={"path": str(path)}) from exc
    if st.st_mode & 0o077:
        raise IdentityError(
            f"{path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); the device "
            f"key must stay private. Fix with: chmod {fix_mode} {path}",
            data={"path": str(path)},
        )


def _read_private(path: Path) -> bytes:
    _check_private(path, "600")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror}", data={"path": str(path)}) from exc


def _load_key(path: Path) -> ed25519.Ed25519PrivateKey:
    data = _read_private(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise IdentityError(
            f"{path} is not a readable private key ({exc}); restore it from a backup, or move it "
            "away to create a new identity (a new device ID that peers must trust again)",
            data={"path": str(path)},
        ) from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise IdentityError(
            f"{path} holds a {type(key).__name__}; p2pstore device keys are Ed25519",
            data={"path": str(path)},
        )
    return key


def _load_cert(path: Path) -> x509.Certificate:
    data = _read_private(path)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise IdentityError(
            f"{path} is not a readable certificate ({exc}); delete it and restart to issue a new one "
            "(the device ID stays the same)",
            data={"path": str(path)},
        ) from exc


def _make_cert(key: ed25519.Ed25519PrivateKey, device_id: str) -> x509.Certificate:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "p2pstore"),
            x509.NameAttribute(NameOID.COMMON_NAME, device_id),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(key, None)
    )


def atomic_write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``, mode 0600, atomically and durably.

    Temporary file + fsync + rename + fsync of the directory: after a crash
    the file holds either the old or the new content. Raises ``OSError``;
    callers name the file in their own error.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_private(path: Path, data: bytes) -> None:
    try:
        atomic_write_private(path, data)
    except OSError as exc:
        raise IdentityError(f"cannot write {path}: {exc.strerror}", data={"path": str(path)}) from exc
