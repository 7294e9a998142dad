"""Trust list: persistence, atomic replacement, refusal of corrupt files, listeners."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from p2pstore.errors import ConfigError, InvalidDeviceId
from p2pstore.net.identity import device_id_from_key_hash, key_hash_from_device_id
from p2pstore.net.trust import TrustStore

A = "P56IOI7-MZJNU2Y-IQGDREY-DM2MGTI-MGL3BXN-PQ6W5BM-TBBZ4TJ-XZWICQ2"
B_TYPED = "p561017mzjnu2yiqgdreydm2mgtimgl3bxnpq6w5bmt88z4tjxzwicq2"  # same device as A


def test_trust_persists_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "trust.json"
    store = TrustStore(path, clock=lambda: 1000.0)
    entry = store.trust(A, name="phone")
    assert entry.key_sha256 == key_hash_from_device_id(A).hex()
    assert store.is_trusted(A) and store.is_trusted(B_TYPED)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    again = TrustStore(path)
    assert again.get(A) == entry
    assert [e.device_id for e in again.entries()] == [A]


def test_untrust(tmp_path: Path) -> None:
    store = TrustStore(tmp_path / "trust.json")
    store.trust(A)
    assert store.untrust(B_TYPED) is True
    assert store.untrust(A) is False
    assert not store.is_trusted(A)
    assert TrustStore(tmp_path / "trust.json").entries() == []


def test_bad_ids_are_refused_or_simply_untrusted(tmp_path: Path) -> None:
    store = TrustStore(tmp_path / "trust.json")
    with pytest.raises(InvalidDeviceId):
        store.trust(A[:-1] + "3")
    assert store.is_trusted("garbage") is False


def test_note_seen_updates_trusted_devices_only(tmp_path: Path) -> None:
    store = TrustStore(tmp_path / "trust.json", clock=lambda: 5.0)
    store.note_seen(A, "intruder", 4)
    assert store.get(A) is None
    store.trust(A)
    store.note_seen(A, "phone", 3, cert_sha256="ab" * 32)
    entry = TrustStore(tmp_path / "trust.json").get(A)
    assert entry is not None
    assert (entry.name, entry.security_level, entry.cert_sha256, entry.last_seen) == ("phone", 3, "ab" * 32, 5.0)
    # A name the user gave wins over the announced one.
    store.trust(A, name="my phone")
    store.note_seen(A, "phone", 2)
    assert store.get(A).name == "my phone"  # type: ignore[union-attr]


def test_listeners_hear_changes(tmp_path: Path) -> None:
    store = TrustStore(tmp_path / "trust.json")
    heard: list[tuple[str, bool]] = []
    remove = store.add_listener(lambda d, t: heard.append((d, t)))
    store.trust(A)
    store.trust(A)  # no change, no event
    store.untrust(A)
    remove()
    store.trust(A)
    assert heard == [(A, True), (A, False)]


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "trust.json"
    store = TrustStore(path)
    store.trust(A, name="old")
    before = path.read_bytes()

    def crash(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(ConfigError, match=str(path)):
        store.trust(A, name="new")
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert TrustStore(path).get(A).name == "old"  # type: ignore[union-attr]
    assert [p.name for p in tmp_path.iterdir() if p.name != "trust.json"] in ([], [".trust.json.tmp"])


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        b'{"version": 99, "devices": []}',
        b'{"version": 1, "devices": [{"device_id": "x"}]}',
    ],
)
def test_corrupt_file_is_refused_with_its_path(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "trust.json"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match=f"trust file {path} is corrupt"):
        TrustStore(path)


def test_tampered_key_hash_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "trust.json"
    TrustStore(path).trust(A)
    doc = json.loads(path.read_text())
    doc["devices"][0]["key_sha256"] = "00" * 32
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="key_sha256"):
        TrustStore(path)


def test_world_writable_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "trust.json"
    TrustStore(path).trust(A)
    os.chmod(path, 0o666)
    with pytest.raises(ConfigError, match=f"chmod 600 {path}"):
        TrustStore(path)


def test_trust_many_is_one_write_all_or_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "trust.json"
    store = TrustStore(path)
    heard: list[tuple[str, bool]] = []
    store.add_listener(lambda d, t: heard.append((d, t)))
    ids = [device_id_from_key_hash(os.urandom(32)) for _ in range(50)]
    writes: list[object] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (writes.append(dst), real_replace(src, dst)))

    entries = store.trust_many([(d, f"n{i}") for i, d in enumerate(ids)] + [(ids[0], "renamed")])
    assert len(writes) == 1, "one write of the trust file for the whole list"
    assert [e.device_id for e in entries] == [*ids, ids[0]] and entries[-1].name == "renamed"
    assert heard == [(d, True) for d in ids], "each new device is announced once"
    assert {e.device_id for e in TrustStore(path).entries()} == set(ids)

    before = path.read_bytes()
    fresh = device_id_from_key_hash(os.urandom(32))
    with pytest.raises(InvalidDeviceId):
        store.trust_many([(fresh, None), ("not-an-id", None)])
    assert len(writes) == 1 and path.read_bytes() == before and not store.is_trusted(fresh), "a bad ID trusts none"
    store.trust_many([(d, None) for d in ids[1:]])  # nothing new: no write
    assert len(writes) == 1


def test_trust_many_leaves_memory_unchanged_when_the_write_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = TrustStore(tmp_path / "trust.json")

    def crash(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(ConfigError):
        store.trust_many([(A, None)])
    assert not store.is_trusted(A), "not trusted in memory while the file says otherwise"
