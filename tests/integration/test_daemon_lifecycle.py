"""The daemon process: signals, stale sockets, a second daemon, bad config,
log level, restarts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from p2ps_helpers import LOOPBACK, REPO, DaemonProcess, write_config

from p2pstore.errors import SqlError


def run_daemon(root: Path, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run ``p2pstore daemon`` that is expected to exit by itself (refusing to start)."""
    argv = [sys.executable, "-m", "p2pstore", "daemon", "--no-discovery", *LOOPBACK, "--port", "0",
            "--data-dir", str(root / "data-x"), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_exits_0_and_removes_the_socket(start_daemon: Callable[..., DaemonProcess], sig: int) -> None:
    d = start_daemon("stopper")
    with d.client() as c:
        c.call("store.open", store="s")
        c.call("store.execute", store="s", sql="CREATE TABLE T (id INTEGER PRIMARY KEY)")
        c.call("store.set_distributed_tables", store="s", tables=["T"])
        c.call("store.subscribe", store="s", type="local_details")
        assert d.stop(sig) == 0  # a client is still connected and subscribed
    assert not d.socket.exists()
    assert "daemon stopped" in d.log()


def test_shutdown_with_a_connected_client_logs_no_traceback(start_daemon: Callable[..., DaemonProcess]) -> None:
    d = start_daemon("tidy")
    with d.client() as c:
        c.call("device.info")
        assert d.stop() == 0
    assert "Traceback" not in d.log(), d.log()[-3000:]


def test_a_stale_socket_from_a_killed_daemon_is_replaced(start_daemon: Callable[..., DaemonProcess]) -> None:
    d = start_daemon("crashy")
    with d.client() as c:
        device_id = c.call("device.info")["device_id"]
        c.call("store.open", store="s")
        c.call("store.execute", store="s", sql="CREATE TABLE T (v)")
        c.call("store.execute", store="s", sql="INSERT INTO T VALUES ('before the crash')")
    d.kill()
    assert d.socket.exists(), "kill -9 leaves the socket file behind"
    with socket.socket(socket.AF_UNIX) as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(str(d.socket))
    d.start()  # same data dir, same socket
    with d.client() as c:
        assert c.call("device.info")["device_id"] == device_id  # identity survives
        c.call("store.open", store="s")
        assert c.call("store.query", store="s", sql="SELECT v FROM T")["rows"] == [["before the crash"]]
    assert "stale socket" in d.log()


def test_the_socket_accepts_only_once_the_daemon_is_whole(start_daemon: Callable[..., DaemonProcess]) -> None:
    """The first connection a restarted daemon accepts already sees its peer
    port and device layer, even while it has many auto-sync stores to open."""
    d = start_daemon("whole")
    with d.client() as c:
        for i in range(12):
            c.call("store.open", store=f"s{i}")
            c.call("store.execute", store=f"s{i}", sql="CREATE TABLE T (id INTEGER PRIMARY KEY, v)")
            c.call("store.set_distributed_tables", store=f"s{i}", tables=["T"], config={"auto_sync": True})
    assert d.stop() == 0
    d.start()  # returns as soon as a connect succeeds
    with d.client() as c:
        assert c.call("device.info")["port"] > 0  # the bound port, not --port 0
        assert c.call("devices.list") == []  # not "the device layer is not running yet"
    assert "opened 12 store(s) with auto-sync tables" in d.log()


def test_a_second_daemon_on_the_same_socket_refuses_to_start(start_daemon: Callable[..., DaemonProcess]) -> None:
    d = start_daemon("first")
    result = run_daemon(d.root, "--socket", str(d.socket), "--name", "second")
    assert result.returncode == 1, result
    assert "already running" in result.stderr
    assert str(d.socket) in result.stderr
    assert "Traceback" not in result.stderr
    with d.client() as c:
        assert c.call("device.info")["name"] == "first"  # the first one is untouched


def test_a_path_that_is_not_a_socket_is_not_replaced(short_tmp: Path) -> None:
    path = short_tmp / "not-a-socket"
    path.write_text("precious")
    result = run_daemon(short_tmp, "--socket", str(path))
    assert result.returncode == 1
    assert str(path) in result.stderr and "not a socket" in result.stderr
    assert path.read_text() == "precious"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("port = = 1\n", ["TOML"]),
        ("prot = 7400\n", ["prot"]),
        ('port = "seventy"\n', ["port"]),
        ("max_subscriptions = 0\n", ["max_subscriptions"]),
        ('interfaces = ["not-an-ip"]\n', ["interfaces"]),
    ],
    ids=["invalid TOML", "unknown key", "wrong type", "out of range", "bad list item"],
)
def test_a_bad_config_file_exits_1_naming_the_file_and_key(short_tmp: Path, text: str, words: list[str]) -> None:
    config = write_config(short_tmp, text, "bad.toml")
    result = run_daemon(short_tmp, "--socket", str(short_tmp / "x.sock"), "--config", str(config))
    assert result.returncode == 1, result
    assert str(config) in result.stderr
    for word in words:
        assert word in result.stderr
    assert "CONFIG_INVALID" in result.stderr and "Traceback" not in result.stderr
    assert not (short_tmp / "x.sock").exists()


def test_a_missing_config_file_exits_1(short_tmp: Path) -> None:
    result = run_daemon(short_tmp, "--socket", str(short_tmp / "x.sock"), "--config", str(short_tmp / "absent.toml"))
    assert result.returncode == 1 and "absent.toml" in result.stderr


def test_bad_flags_are_usage_errors(short_tmp: Path) -> None:
    result = run_daemon(short_tmp, "--socket", str(short_tmp / "x.sock"), "--security-level", "S9")
    assert result.returncode == 2 and "S9" in result.stderr
    result = run_daemon(short_tmp, "--socket", str(short_tmp / "x.sock"), "--no-such-flag")
    assert result.returncode == 2


def test_log_level_warning_hides_info_and_debug(start_daemon: Callable[..., DaemonProcess]) -> None:
    d = start_daemon("quiet", "--log-level", "warning")  # the later flag wins over the fixture's debug
    with d.client() as c:
        c.call("store.open", store="s")
        with pytest.raises(SqlError):
            c.call("store.execute", store="s", sql="SELEC")  # an error answer is not a daemon warning
    d.stop()
    lines = [line for line in d.log().splitlines() if line.strip()]
    assert not [line for line in lines if " INFO " in line or " DEBUG " in line], lines


def test_log_level_debug_shows_debug(start_daemon: Callable[..., DaemonProcess]) -> None:
    d = start_daemon("loud", "--log-level", "debug")
    with d.client() as c:
        c.call("device.info")
    d.stop()
    log = d.log()
    assert " DEBUG " in log and " INFO " in log
    assert "aiosqlite" not in log  # statement-level noise stays off even at debug


def test_config_file_settings_reach_the_running_daemon(start_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    config = write_config(tmp_path, 'security_level = "S3"\ndefault_store = "main"\n')
    d = start_daemon("configured", "--config", str(config))
    with d.client() as c:
        info = c.call("device.info")
    assert info["security_level"] == "S3" and info["default_store"] == "main"


def test_flags_override_the_config_file(start_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    config = write_config(tmp_path, 'security_level = "S3"\n')
    d = start_daemon("flagged", "--config", str(config), "--security-level", "S2")
    with d.client() as c:
        assert c.call("device.info")["security_level"] == "S2"


def test_data_dir_and_identity_files_are_private(start_daemon: Callable[..., DaemonProcess]) -> None:
    d = start_daemon("private")
    assert (d.data_dir.stat().st_mode & 0o077) == 0
    for path in d.data_dir.rglob("*.pem"):
        assert (path.stat().st_mode & 0o077) == 0, path
    assert os.access(d.data_dir, os.R_OK)
