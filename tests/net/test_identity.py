"""Identity: key and certificate on disk, device ID format and check characters."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography import x509

from p2pstore.errors import IdentityError, InvalidDeviceId
from p2pstore.net.identity import (
    Identity,
    device_id_from_cert_der,
    device_id_from_key_hash,
    key_hash_from_device_id,
    luhn32,
    normalize_device_id,
)

# Syncthing's published vectors (lib/protocol/luhn_test.go, deviceid_test.go).
SYNCTHING_ID = "P56IOI7-MZJNU2Y-IQGDREY-DM2MGTI-MGL3BXN-PQ6W5BM-TBBZ4TJ-XZWICQ2"


@pytest.mark.parametrize(
    ("text", "check"),
    [("AB725E4GHIQPL3ZFGT", "G"), ("WG2IWWALPC2HZ", "H"), ("KHQNO2S5QSILR", "K"), ("MFZWI3DBONSGY", "C")],
)
def test_luhn32_known_vectors(text: str, check: str) -> None:
    assert luhn32(text) == check


def test_luhn32_refuses_characters_outside_base32() -> None:
    with pytest.raises(InvalidDeviceId, match="'1'"):
        luhn32("3734EJEKMRHWPZQTWYQ1")


@pytest.mark.parametrize(
    "typed",
    [
        SYNCTHING_ID,
        "P56IOI7 MZJNU2Y IQGDREY DM2MGTI MGL3BXN PQ6W5BM TBBZ4TJ XZWICQ2",
        "P56IOI-7MZJNU2Y-IQGDR-EYDM2M-GTI-MGL3-BXNPQ6-W5BM-TBB-Z4TJXZ-WICQ2",
        "P56IOI7MZJNU2YIQGDREYDM2MGTIMGL3BXNPQ6W5BMTBBZ4TJXZWICQ2",
        "p56ioi7mzjnu2yiqgdreydm2mgtimgl3bxnpq6w5bmtbbz4tjxzwicq2",
        "P561017MZJNU2YIQGDREYDM2MGTIMGL3BXNPQ6W5BMT88Z4TJXZWICQ2",  # 0/1/8 look-alikes
        "  p561017mzjnu2yiqgdreydm2mgtimgl3bxnpq6w5bmt88z4tjxzwicq2\n",
    ],
)
def test_normalize_accepts_what_people_type(typed: str) -> None:
    assert normalize_device_id(typed) == SYNCTHING_ID


def test_normalize_detects_a_mistyped_character() -> None:
    typo = "P56IOI7-MZJNU2Y-IQGDREY-DM2MGTI-MGL3BXN-PQ6W5BM-TBBZ4TJ-XZWICQ3"
    with pytest.raises(InvalidDeviceId, match="check character wrong: the ID was probably mistyped"):
        normalize_device_id(typo)
    swapped = "P56IOI7-MZJNU2Y-IQGDREY-DM2MGTI-MGL3BXN-PQ6W5BM-TBBZ4TJ-XZWIQC2"
    with pytest.raises(InvalidDeviceId, match="mistyped"):
        normalize_device_id(swapped)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a",
        "P56IOI7MZJNU2IQGDREYDM2MGTMGL3BXNPQ6W5BTBBZ4TJXZWICQ",  # 52 chars: no check characters
        SYNCTHING_ID + "A",
        SYNCTHING_ID.replace("P56", "P5!"),
    ],
)
def test_normalize_refuses_wrong_length_or_characters(bad: str) -> None:
    with pytest.raises(InvalidDeviceId):
        normalize_device_id(bad)


def test_every_generated_id_validates_and_round_trips() -> None:
    for i in range(50):
        digest = bytes((i * 7 + j) % 256 for j in range(32))
        device_id = device_id_from_key_hash(digest)
        assert len(device_id) == 63 and device_id.count("-") == 7
        assert normalize_device_id(device_id.lower().replace("-", "")) == device_id
        assert key_hash_from_device_id(device_id) == digest


def test_create_then_reload_gives_the_same_id(tmp_path: Path) -> None:
    first = Identity.load_or_create(tmp_path, "laptop")
    folder = tmp_path / "identity"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in (first.key_path, first.cert_path):
        assert path.parent == folder
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = Identity.load_or_create(tmp_path, "laptop")
    assert second.device_id == first.device_id
    assert second.cert_der == first.cert_der
    assert device_id_from_cert_der(first.cert_der) == first.device_id
    assert normalize_device_id(first.device_id) == first.device_id


def test_two_devices_get_different_ids(tmp_path: Path) -> None:
    a = Identity.load_or_create(tmp_path / "a", "a")
    b = Identity.load_or_create(tmp_path / "b", "b")
    assert a.device_id != b.device_id


def test_certificate_is_self_signed_tls_usable(tmp_path: Path) -> None:
    ident = Identity.load_or_create(tmp_path, "x")
    cert = x509.load_der_x509_certificate(ident.cert_der)
    assert cert.issuer == cert.subject
    assert ident.device_id in cert.subject.rfc4514_string()


@pytest.mark.parametrize("which", ["key.pem", "cert.pem"])
def test_group_readable_file_is_refused(tmp_path: Path, which: str) -> None:
    Identity.load_or_create(tmp_path, "x")
    path = tmp_path / "identity" / which
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match=f"chmod 600 {path}"):
        Identity.load_or_create(tmp_path, "x")


def test_open_identity_directory_is_refused(tmp_path: Path) -> None:
    Identity.load_or_create(tmp_path, "x")
    os.chmod(tmp_path / "identity", 0o755)
    with pytest.raises(IdentityError, match="chmod 700"):
        Identity.load_or_create(tmp_path, "x")


def test_corrupt_key_is_refused(tmp_path: Path) -> None:
    ident = Identity.load_or_create(tmp_path, "x")
    ident.key_path.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    with pytest.raises(IdentityError, match=str(ident.key_path)):
        Identity.load_or_create(tmp_path, "x")


def test_corrupt_certificate_is_refused(tmp_path: Path) -> None:
    ident = Identity.load_or_create(tmp_path, "x")
    ident.cert_path.write_bytes(b"not a certificate")
    with pytest.raises(IdentityError, match=str(ident.cert_path)):
        Identity.load_or_create(tmp_path, "x")


def test_certificate_of_another_key_is_refused(tmp_path: Path) -> None:
    a = Identity.load_or_create(tmp_path / "a", "a")
    b = Identity.load_or_create(tmp_path / "b", "b")
    a.cert_path.write_bytes(b.cert_path.read_bytes())
    with pytest.raises(IdentityError, match="does not belong to the key"):
        Identity.load_or_create(tmp_path / "a", "a")


def test_missing_certificate_is_reissued_with_the_same_id(tmp_path: Path) -> None:
    first = Identity.load_or_create(tmp_path, "x")
    first.cert_path.unlink()
    second = Identity.load_or_create(tmp_path, "x")
    assert second.device_id == first.device_id


def test_missing_key_is_an_error_not_a_new_identity(tmp_path: Path) -> None:
    first = Identity.load_or_create(tmp_path, "x")
    first.key_path.unlink()
    with pytest.raises(IdentityError, match="key .* is missing"):
        Identity.load_or_create(tmp_path, "x")
    assert not first.key_path.exists()
