"""Config: defaults < TOML file < flags, validated against the JSON Schema."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from p2pstore.config import (
    DEFAULT_PORT,
    Config,
    build_config,
    default_data_dir,
    default_socket_path,
    read_config_file,
)
from p2pstore.errors import ConfigError
from p2pstore.schemas import SCHEMAS_DIR

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p2pstore.toml"
    path.write_text(text)
    return path


def config_error(file: Path | None = None, overrides: dict | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        build_config(file, overrides)
    assert info.value.name == "CONFIG_INVALID"
    return info.value


# -- defaults -------------------------------------------------------------------------

def test_defaults_suit_one_user_on_one_machine() -> None:
    c = Config()
    assert c.port == DEFAULT_PORT == 7400
    assert c.max_stores_per_bundle == 16
    assert c.max_subscriptions == 8
    assert c.max_request_bytes == 1 << 20
    assert c.security_level == "S1" and c.security_level_int == 1
    assert c.default_store == "default"
    assert c.discovery is True
    assert c.sync_schema_path == c.data_dir / "sync_schema.json"
    assert 1 <= len(c.name) <= 63


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().port = 1  # type: ignore[misc]


def test_to_dict_is_plain_json() -> None:
    d = Config(interfaces=("127.0.0.1",)).to_dict()
    json.dumps(d)
    assert d["interfaces"] == ["127.0.0.1"] and isinstance(d["data_dir"], str)


def test_every_config_field_is_in_the_json_schema_and_back() -> None:
    schema = json.loads((SCHEMAS_DIR / "config.schema.json").read_text())
    assert set(schema["properties"]) == {f.name for f in dataclasses.fields(Config)}
    assert schema["additionalProperties"] is False


def test_every_config_key_is_documented() -> None:
    doc = REPO / "docs" / "config.md"
    if not doc.exists():
        pytest.skip("docs/config.md not written yet")
    text = doc.read_text()
    missing = [f.name for f in dataclasses.fields(Config) if f"`{f.name}`" not in text]
    assert not missing, f"docs/config.md does not mention: {missing}"


# -- default paths --------------------------------------------------------------------------

@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in ("P2PSTORE_SOCKET", "RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR", "STATE_DIRECTORY", "XDG_DATA_HOME"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_socket_path_precedence(clean_env: pytest.MonkeyPatch) -> None:
    import os

    if os.geteuid() == 0:
        assert default_socket_path() == Path("/run/p2pstore/p2pstore.sock")
    else:
        assert default_socket_path() == Path(f"/tmp/p2pstore-{os.geteuid()}/p2pstore.sock")
    clean_env.setenv("XDG_RUNTIME_DIR", "/xdg")
    assert default_socket_path() == Path("/xdg/p2pstore.sock")
    clean_env.setenv("RUNTIME_DIRECTORY", "/run/unit:/other")
    assert default_socket_path() == Path("/run/unit/p2pstore.sock")
    clean_env.setenv("P2PSTORE_SOCKET", "/explicit.sock")
    assert default_socket_path() == Path("/explicit.sock")


def test_data_dir_precedence(clean_env: pytest.MonkeyPatch) -> None:
    assert default_data_dir() == Path.home() / ".local" / "share" / "p2pstore"
    clean_env.setenv("XDG_DATA_HOME", "/xdgdata")
    assert default_data_dir() == Path("/xdgdata/p2pstore")
    clean_env.setenv("STATE_DIRECTORY", "/var/lib/p2pstore:/x")
    assert default_data_dir() == Path("/var/lib/p2pstore")


def test_env_socket_reaches_a_new_config(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("P2PSTORE_SOCKET", "/env.sock")
    assert build_config().socket == Path("/env.sock")


# -- file and flags ----------------------------------------------------------------------------

def test_file_values_are_applied_and_converted(tmp_path: Path) -> None:
    path = write(tmp_path, """
name = "kitchen"
data_dir = "~/p2p-data"
port = 0
interfaces = ["127.0.0.1"]
peers = ["10.0.0.2:7400", "host-b:7401"]
allowed_uids = [1000]
discovery = false
security_level = "S3"
max_stores_per_bundle = 2
max_subscriptions = 2
max_request_bytes = 4096
remote_query_timeout_s = 2.5
synchronous = "FULL"
log_level = "debug"
""")
    c = build_config(path)
    assert c.name == "kitchen"
    assert c.data_dir == Path.home() / "p2p-data"
    assert c.port == 0
    assert c.interfaces == ("127.0.0.1",) and c.peers == ("10.0.0.2:7400", "host-b:7401")
    assert c.allowed_uids == (1000,)
    assert c.discovery is False and c.security_level_int == 3
    assert (c.max_stores_per_bundle, c.max_subscriptions, c.max_request_bytes) == (2, 2, 4096)
    assert c.remote_query_timeout_s == 2.5 and c.synchronous == "FULL" and c.log_level == "debug"


def test_flags_override_the_file_and_missing_flags_do_not(tmp_path: Path) -> None:
    path = write(tmp_path, 'name = "file"\nport = 7000\nsocket = "/tmp/file.sock"\ninterfaces = ["127.0.0.1"]\n')
    c = build_config(path, {"name": "flag", "port": None, "socket": "/tmp/flag.sock", "interfaces": [], "peers": None})
    assert c.name == "flag"
    assert c.port == 7000  # None = flag not given
    assert c.socket == Path("/tmp/flag.sock")
    assert c.interfaces == ("127.0.0.1",)  # [] = flag not given


def test_false_flag_is_given(tmp_path: Path) -> None:
    assert build_config(None, {"discovery": False}).discovery is False


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert build_config(write(tmp_path, "")).port == DEFAULT_PORT


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "port = = 3\n")
    err = config_error(path)
    assert str(path) in err.message and "TOML" in err.message


def test_unknown_key_names_the_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, 'prot = 7400\n')
    err = config_error(path)
    assert str(path) in err.message and "prot" in err.message
    assert err.data["source"] == str(path)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('port = "7400"', "port"),
        ("port = 70000", "port"),
        ("discovery = 1", "discovery"),
        ('security_level = "S5"', "security_level"),
        ('log_level = "loud"', "log_level"),
        ("max_stores_per_bundle = 0", "max_stores_per_bundle"),
        ("max_request_bytes = 10", "max_request_bytes"),
        ('interfaces = ["not-an-ip"]', "interfaces.0"),
        ('peers = ["no-port"]', "peers.0"),
        ("allowed_uids = [-1]", "allowed_uids.0"),
        ('name = ""', "name"),
        ("max_clock_offset_ms = 10", "max_clock_offset_ms"),
        ("max_clock_offset_ms = 1.5", "max_clock_offset_ms"),
        ("sync_window = 0", "sync_window"),
        ("sync_window = 65", "sync_window"),
        ("sync_window = 2.5", "sync_window"),
        ("relay_fanout = -1", "relay_fanout"),
        ("relay_fanout = 1.5", "relay_fanout"),
        ("anti_entropy_interval_s = -1", "anti_entropy_interval_s"),
        ('anti_entropy_interval_s = "often"', "anti_entropy_interval_s"),
        ("[section]\nport = 1", "(top level)"),
    ],
)
def test_wrong_values_name_the_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text + "\n")
    err = config_error(path)
    assert str(path) in err.message
    assert err.data["key"] == key
    assert (key if key != "(top level)" else "section") in err.message


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    err = config_error(tmp_path / "absent.toml")
    assert "absent.toml" in err.message


def test_bad_flag_values_name_the_command_line() -> None:
    err = config_error(None, {"port": -1})
    assert err.data["source"] == "command line" and err.data["key"] == "port"


def test_read_config_file_returns_the_validated_mapping(tmp_path: Path) -> None:
    assert read_config_file(write(tmp_path, "port = 1\n")) == {"port": 1}


def test_max_clock_offset_reaches_the_config(tmp_path: Path) -> None:
    assert build_config().max_clock_offset_ms == 300_000  # five minutes (docs/config.md)
    assert build_config(write(tmp_path, "max_clock_offset_ms = 60000\n")).max_clock_offset_ms == 60_000


def test_sync_window_reaches_the_config(tmp_path: Path) -> None:
    assert build_config().sync_window == 32  # docs/config.md
    assert build_config(write(tmp_path, "sync_window = 64\n")).sync_window == 64
    assert build_config(write(tmp_path, "sync_window = 1\n")).sync_window == 1


def test_fleet_options_reach_the_config(tmp_path: Path) -> None:
    default = build_config()
    assert default.relay_fanout == 1 and default.anti_entropy_interval_s == 30.0  # docs/config.md
    got = build_config(write(tmp_path, "relay_fanout = 0\nanti_entropy_interval_s = 2.5\n"))
    assert got.relay_fanout == 0 and got.anti_entropy_interval_s == 2.5


def test_the_active_set_defaults_agree_with_the_overlay() -> None:
    # config.py is layer 0 and can't import net/overlay.py: each states the default once, checked here.
    from p2pstore.config import Config
    from p2pstore.net.overlay import DEFAULT_ACTIVE_SET, DEFAULT_FULL_MESH_PEERS

    assert (Config().active_set, Config().full_mesh_peers) == (DEFAULT_ACTIVE_SET, DEFAULT_FULL_MESH_PEERS) == (8, 16)
