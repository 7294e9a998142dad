"""The user's list of trusted devices, persisted as one JSON file.

Invariants:

- Only ``trust`` adds a device and only ``untrust`` removes one; nothing a
  peer sends can change the list (``note_seen`` only refreshes what we last
  saw of a device that is already trusted).
- Device IDs are stored in canonical form, so lookups by the ID a
  certificate yields are exact string matches.
- ``key_sha256`` is the key hash the ID encodes: the pin. A certificate whose
  key hashes to anything else yields another ID and is not trusted.
- The file is replaced atomically (temporary file, fsync, rename, 0600): a
  crash leaves the old list or the new one, never a mix. A file that is
  corrupt, or writable by group or others, is refused with its path named,
  never silently reset to "trust nobody" or used as-is.
- Listeners hear every change in trust, so the peer manager can drop a
  channel the moment its device is untrusted, whoever called ``untrust``.

Not thread-safe: one event loop owns it.
"""

from __future__ import annotations

import json
import logging
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from p2pstore.errors import ConfigError, InvalidDeviceId
from p2pstore.net.identity import atomic_write_private, key_hash_from_device_id, normalize_device_id

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: Largest trust file we read; a real one is a few KiB.
MAX_FILE_SIZE = 4 * 1024 * 1024

TrustListener = Callable[[str, bool], None]


@dataclass(frozen=True, slots=True)
class TrustEntry:
    """One trusted device, with what was last seen of it."""

    device_id: str
    name: str | None
    security_level: int | None
    key_sha256: str
    cert_sha256: str | None
    trusted_at: float
    last_seen: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrustStore:
    """Persistent set of trusted device IDs (see module docstring)."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._entries: dict[str, TrustEntry] = self._load()
        self._listeners: list[TrustListener] = []

    # -- queries -------------------------------------------------------------

    def is_trusted(self, device_id: str) -> bool:
        """Whether ``device_id`` is trusted; a malformed ID simply is not."""
        if device_id in self._entries:
            return True
        try:
            return normalize_device_id(device_id) in self._entries
        except InvalidDeviceId:
            return False

    def get(self, device_id: str) -> TrustEntry | None:
        return self._entries.get(normalize_device_id(device_id))

    def entries(self) -> list[TrustEntry]:
        return sorted(self._entries.values(), key=lambda e: e.device_id)

    # -- changes -------------------------------------------------------------

    def trust(self, device_id: str, name: str | None = None) -> TrustEntry:
        """Trust a device (idempotent; a given ``name`` replaces the old one)."""
        return self.trust_many([(device_id, name)])[0]

    def trust_many(self, devices: Sequence[tuple[str, str | None]]) -> list[TrustEntry]:
        """Trust each ``(device_id, name)`` as ``trust`` does, with one write
        of the file: all or none. A malformed ID raises ``InvalidDeviceId``
        before anything changes (``DeviceDirectory.trust_many`` names its index)."""
        ids = [normalize_device_id(device_id) for device_id, _ in devices]
        entries = dict(self._entries)
        result = []
        for device_id, (_, name) in zip(ids, devices):
            entry = entries.get(device_id)
            if entry is None:
                entry = TrustEntry(
                    device_id=device_id,
                    name=name,
                    security_level=None,
                    key_sha256=key_hash_from_device_id(device_id).hex(),
                    cert_sha256=None,
                    trusted_at=self._clock(),
                    last_seen=None,
                )
            elif name is not None:
                entry = replace(entry, name=name)
            entries[device_id] = entry
            result.append(entry)
        if entries == self._entries:
            return result
        self._save(entries)  # raises before anything changes if the file can't be written
        added = [d for d in dict.fromkeys(ids) if d not in self._entries]
        self._entries = entries
        for device_id in added:
            log.info("device %s is now trusted", device_id)
            self._notify(device_id, True)
        return result

    def untrust(self, device_id: str) -> bool:
        """Stop trusting a device; False if it wasn't trusted."""
        device_id = normalize_device_id(device_id)
        if self._entries.pop(device_id, None) is None:
            return False
        self._save()
        log.info("device %s is no longer trusted", device_id)
        self._notify(device_id, False)
        return True

    def note_seen(
        self,
        device_id: str,
        name: str | None,
        security_level: int | None,
        *,
        cert_sha256: str | None = None,
    ) -> None:
        """Record what a trusted device announced; ignored for others.

        A name given at ``trust`` time is the user's and is kept; the
        announced name only fills it in when none was given.
        """
        entry = self._entries.get(device_id)
        if entry is None:
            return
        if cert_sha256 is not None and entry.cert_sha256 not in (None, cert_sha256):
            log.warning(
                "device %s presents a new certificate (same key, so same ID): %s, was %s",
                device_id,
                cert_sha256,
                entry.cert_sha256,
            )
        self._entries[device_id] = replace(
            entry,
            name=entry.name if entry.name is not None else name,
            security_level=security_level if security_level is not None else entry.security_level,
            cert_sha256=cert_sha256 or entry.cert_sha256,
            last_seen=self._clock(),
        )
        self._save()

    def add_listener(self, listener: TrustListener) -> Callable[[], None]:
        """Call ``listener(device_id, trusted)`` on every change; returns a remover."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _notify(self, device_id: str, trusted: bool) -> None:
        for listener in list(self._listeners):
            try:
                listener(device_id, trusted)
            except Exception:  # noqa: BLE001 - one bad listener must not block the others
                log.exception("trust listener failed for %s", device_id)

    # -- file ------------------------------------------------------------------

    def _corrupt(self, detail: str) -> ConfigError:
        return ConfigError(
            f"trust file {self.path} is corrupt: {detail}. Repair it, or move it away to start "
            "with no trusted devices",
            data={"path": str(self.path)},
        )

    def _load(self) -> dict[str, TrustEntry]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ConfigError(f"cannot read trust file {self.path}: {exc.strerror}", data={"path": str(self.path)}) from exc
        if st.st_mode & 0o022:
            raise ConfigError(
                f"trust file {self.path} is writable by group or others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}), so anyone could add devices to it. "
                f"Fix with: chmod 600 {self.path}",
                data={"path": str(self.path)},
            )
        if st.st_size > MAX_FILE_SIZE:
            raise self._corrupt(f"{st.st_size} bytes is far larger than any trust list")
        try:
            doc = json.loads(self.path.read_bytes())
        except (OSError, ValueError) as exc:
            raise self._corrupt(f"not valid JSON ({exc})") from exc
        if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION or not isinstance(doc.get("devices"), list):
            raise self._corrupt(f'expected {{"version": {FORMAT_VERSION}, "devices": [...]}}')
        entries: dict[str, TrustEntry] = {}
        for i, raw in enumerate(doc["devices"]):
            entry = self._parse_entry(raw, f"devices[{i}]")
            if entry.device_id in entries:
                raise self._corrupt(f"devices[{i}]: {entry.device_id} is listed twice")
            entries[entry.device_id] = entry
        return entries

    def _parse_entry(self, raw: object, where: str) -> TrustEntry:
        fields = TrustEntry.__dataclass_fields__
        if not isinstance(raw, dict) or raw.keys() != fields.keys():
            raise self._corrupt(f"{where}: expected an object with keys {sorted(fields)}")
        try:
            device_id = normalize_device_id(raw["device_id"])
        except InvalidDeviceId as exc:
            raise self._corrupt(f"{where}.device_id: {exc.message}") from exc
        checks: list[tuple[str, tuple[type, ...]]] = [
            ("name", (str, type(None))),
            ("security_level", (int, type(None))),
            ("key_sha256", (str,)),
            ("cert_sha256", (str, type(None))),
            ("trusted_at", (int, float)),
            ("last_seen", (int, float, type(None))),
        ]
        for key, types_ in checks:
            if not isinstance(raw[key], types_) or isinstance(raw[key], bool):
                raise self._corrupt(f"{where}.{key}: wrong type {type(raw[key]).__name__}")
        level = raw["security_level"]
        if level is not None and level not in range(1, 5):
            raise self._corrupt(f"{where}.security_level: must be 1..4 or null")
        if raw["key_sha256"] != key_hash_from_device_id(device_id).hex():
            raise self._corrupt(f"{where}.key_sha256 does not match the device ID")
        return TrustEntry(**{**raw, "device_id": device_id})

    def _save(self, entries: dict[str, TrustEntry] | None = None) -> None:
        """Write ``entries`` (default: the current ones) to the file, atomically."""
        chosen = self._entries if entries is None else entries
        doc = {"version": FORMAT_VERSION, "devices": [e.to_dict() for e in sorted(chosen.values(), key=lambda e: e.device_id)]}
        data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write_private(self.path, data)
        except OSError as exc:
            raise ConfigError(
                f"cannot write trust file {self.path}: {exc.strerror}", data={"path": str(self.path)}
            ) from exc
