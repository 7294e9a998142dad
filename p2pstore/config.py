"""Configuration: TOML file + command-line flags -> one validated, frozen Config.

Precedence: built-in defaults < config file < flags. The file is checked
against ``p2pstore/schemas/config.schema.json``; an error names the file, the key and
what was wrong. Defaults suit one user on one machine (XDG directories); under
systemd the unit's StateDirectory/RuntimeDirectory are used instead, and
ConfigurationDirectory/config.toml is read if it exists.
"""

from __future__ import annotations

import os
import socket
import tomllib
from dataclasses import dataclass, field, fields, replace
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

from p2pstore.clock import DEFAULT_MAX_OFFSET_MS
from p2pstore.errors import ConfigError
from p2pstore.schemas import load_json_schema

DEFAULT_PORT = 7400
SECURITY_LEVELS = {"S1": 1, "S2": 2, "S3": 3, "S4": 4}


def default_data_dir() -> Path:
    if os.environ.get("STATE_DIRECTORY"):  # systemd StateDirectory=
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "p2pstore"


def default_config_file() -> Path | None:
    """The config file read when ``--config`` is not given: ``config.toml`` in
    systemd's ConfigurationDirectory= (``$CONFIGURATION_DIRECTORY``, i.e.
    /etc/p2pstore), and only if it exists, so a fresh install starts on
    defaults. An explicit ``--config FILE`` that is missing stays an error."""
    if os.environ.get("CONFIGURATION_DIRECTORY"):
        path = Path(os.environ["CONFIGURATION_DIRECTORY"].split(":")[0]) / "config.toml"
        if path.exists():
            return path
    return None


def default_socket_path() -> Path:
    """Where daemon and CLI meet when nobody says otherwise (env P2PSTORE_SOCKET wins)."""
    if os.environ.get("P2PSTORE_SOCKET"):
        return Path(os.environ["P2PSTORE_SOCKET"])
    if os.environ.get("RUNTIME_DIRECTORY"):  # systemd RuntimeDirectory=
        return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0]) / "p2pstore.sock"
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "p2pstore.sock"
    if os.geteuid() == 0:
        return Path("/run/p2pstore/p2pstore.sock")
    return Path(f"/tmp/p2pstore-{os.geteuid()}/p2pstore.sock")


@dataclass(frozen=True, slots=True)
class Config:
    name: str = field(default_factory=lambda: socket.gethostname()[:63] or "p2pstore")
    data_dir: Path = field(default_factory=default_data_dir)
    socket: Path = field(default_factory=default_socket_path)
    socket_group: str | None = None
    allowed_uids: tuple[int, ...] = ()
    port: int = DEFAULT_PORT
    interfaces: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()
    discovery: bool = True
    security_level: str = "S1"
    default_store: str = "default"
    sync_schema: Path | None = None
    log_level: str = "info"
    max_stores_per_bundle: int = 16
    max_subscriptions: int = 8
    notification_queue: int = 1000
    poll_interval_ms: int = 50
    busy_timeout_ms: int = 5000
    max_request_bytes: int = 1 << 20
    remote_query_timeout_s: float = 30.0
    #: Bytes of JSON one store.query / store.remote_query result may take (protocol/results.py).
    max_result_bytes: int = 256 * 1024 * 1024
    synchronous: str = "NORMAL"
    tombstone_horizon_days: float = 30.0
    compact_interval_s: float = 60.0
    compact_keep_recent: int = 10_000
    # Network timers (seconds). None = the default of the module that owns
    # the timer (net/channel.py, net/peers.py, net/discovery.py), which suits
    # a LAN; tests and unusual networks shorten or lengthen them.
    keepalive_interval_s: float | None = None
    peer_dead_after_s: float | None = None
    redial_backoff_max_s: float | None = None
    mdns_record_ttl_s: int | None = None
    mdns_liveness_interval_s: float | None = None
    max_clock_offset_ms: int = DEFAULT_MAX_OFFSET_MS
    #: Sync batches a sender may have unacknowledged (protocol/sync_session.py, 1..64).
    sync_window: int = 32  # protocol.sync_session.DEFAULT_WINDOW (a lower layer: tests check they agree)
    #: Peers a received change is passed on to (sync/engine.py; 0: none, anti-entropy only).
    relay_fanout: int = 1
    #: Peers a device chooses to keep channels to in a large fleet (net/overlay.py; 0: always a full mesh).
    active_set: int = 8  # net.overlay.DEFAULT_ACTIVE_SET (a higher layer: tests check they agree)
    #: Peers in view up to which every device still connects to every other (a full mesh).
    full_mesh_peers: int = 16
    #: Seconds a channel outside the active set (opened on demand) may be idle before its dialer closes it.
    idle_close_s: float = 60.0
    #: Seconds between anti-entropy pulls of each auto-sync store from a random peer (0: off).
    anti_entropy_interval_s: float = 30.0
    #: Sync log entries kept per store (store/sync_log.py).
    sync_log_entries: int = 1000
    #: Apply a store's pending evolutions when it opens (store/evolutions.py; never Downs).
    auto_apply_evolutions: bool = False

    @property
    def security_level_int(self) -> int:
        return SECURITY_LEVELS[self.security_level]

    @property
    def sync_schema_path(self) -> Path:
        return self.sync_schema or self.data_dir / "sync_schema.json"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


@cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        load_json_schema("config.schema.json"), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def validate_settings(settings: dict[str, Any], source: str) -> None:
    """Raise ConfigError naming the first problem (source = file name or 'flags')."""
    errors = sorted(_validator().iter_errors(settings), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise ConfigError(f"{source}: {where}: {err.message}", data={"source": source, "key": where})


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}", data={"source": str(path)}) from exc
    try:
        settings = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}", data={"source": str(path)}) from exc
    validate_settings(settings, str(path))
    return settings


def build_config(file: Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the file, then the flags that were actually given."""
    settings: dict[str, Any] = {}
    if file is not None:
        settings.update(read_config_file(file))
    flags = {k: v for k, v in (overrides or {}).items() if v is not None and v != [] and v != ()}
    validate_settings(flags, "command line")
    settings.update(flags)
    config = Config()
    converted: dict[str, Any] = {}
    for key, value in settings.items():
        if key in ("data_dir", "socket", "sync_schema"):
            value = Path(value).expanduser()
        elif isinstance(value, list):
            value = tuple(value)
        converted[key] = value
    return replace(config, **converted)
