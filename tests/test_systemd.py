"""The systemd unit verifies and starts with or without a config file, and
the daemon speaks sd_notify (READY/STATUS/WATCHDOG/STOPPING) and logs in the
journal's format."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from p2pstore.client import BlockingClient
from p2pstore.service import JournalFormatter, notify, watchdog_interval

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "p2pstore.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "p2pstore"
    assert exe.exists(), "the console script is installed in the venv"
    unit = tmp_path / "p2pstore.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/p2pstore", str(exe)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "p2pstore.service" not in result.stderr, result.stderr


def test_unit_is_hardened_and_notify() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                 "StateDirectory=p2pstore", "RuntimeDirectory=p2pstore", "PrivateTmp=yes", "ExecReload=/bin/kill -HUP $MAINPID"):
        assert line in text, line


def test_daemon_sends_ready_once_socket_listens(short_tmp: Path) -> None:
    notify_path = short_tmp / "notify.sock"
    api_socket = short_tmp / "api.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(20)
        env = {"NOTIFY_SOCKET": str(notify_path), "PATH": "/usr/bin:/bin", "HOME": str(short_tmp)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "p2pstore", "daemon", "--data-dir", str(short_tmp / "data"), "--socket", str(api_socket),
             "--port", "0", "--no-discovery"],
            cwd=REPO, env=env, stderr=subprocess.DEVNULL,
        )
        try:
            message = notify.recv(4096).decode()
            assert "READY=1" in message
            # READY means "the API answers now", not "soon".
            with socket.socket(socket.AF_UNIX) as api:
                api.connect(str(api_socket))
            proc.terminate()
            assert proc.wait(10) == 0
            assert "STOPPING=1" in notify.recv(4096).decode()
        finally:
            proc.kill()
            proc.wait(5)
    assert not api_socket.exists()


def exec_start() -> str:
    return next(line for line in UNIT.read_text().splitlines() if line.startswith("ExecStart="))


def test_unit_needs_no_config_file_and_has_a_watchdog() -> None:
    # A missing --config FILE is an error, so the unit must not pass one: the
    # daemon finds /etc/p2pstore/config.toml through ConfigurationDirectory=.
    assert "--config" not in exec_start()
    text = UNIT.read_text()
    assert "ConfigurationDirectory=p2pstore" in text
    assert "WatchdogSec=" in text


def test_unit_needs_no_account_made_first() -> None:
    """A fresh machine has no p2pstore user: the unit asks systemd for a dynamic one."""
    lines = UNIT.read_text().splitlines()
    assert "DynamicUser=yes" in lines
    assert not [line for line in lines if line.startswith(("User=", "Group="))]


def daemon_argv(root: Path) -> list[str]:
    return [sys.executable, "-m", "p2pstore", "daemon", "--data-dir", str(root / "data"), "--socket", str(root / "api.sock"),
            "--port", "0", "--no-discovery"]


@contextmanager
def notify_socket(root: Path, abstract: bool) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's, and the NOTIFY_SOCKET value naming it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        if abstract:
            name = f"p2ps-test-{secrets.token_hex(6)}"
            sock.bind("\0" + name)
            value = "@" + name
        else:
            value = str(root / "notify.sock")
            sock.bind(value)
        yield sock, value


def collect(sock: socket.socket, until, timeout: float = 30.0) -> list[str]:
    """Notification datagrams until ``until(messages)`` holds (bounded)."""
    messages: list[str] = []
    deadline = time.monotonic() + timeout
    while not until(messages):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; got {messages}"
        sock.settimeout(left)
        messages.append(sock.recv(4096).decode())
    return messages


def lines_of(messages: list[str]) -> list[str]:
    return [line for m in messages for line in m.split("\n")]


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_daemon_reports_ready_status_and_pings_the_watchdog(short_tmp: Path, abstract: bool) -> None:
    with notify_socket(short_tmp, abstract) as (sock, address):
        env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "300000", "PATH": "/usr/bin:/bin", "HOME": str(short_tmp)}
        proc = subprocess.Popen(daemon_argv(short_tmp), cwd=REPO, env=env, stderr=subprocess.DEVNULL)
        try:
            got = collect(sock, lambda ms: sum(line == "WATCHDOG=1" for line in lines_of(ms)) >= 3)
            lines = lines_of(got)
            assert lines[0] == "READY=1", got  # the first message: ready, with a status
            status = [line for line in got[0].split("\n") if line.startswith("STATUS=")]
            assert status and "0 trusted peer(s) online" in status[0] and "no sync received yet" in status[0], got
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
            assert "STOPPING=1" in lines_of(collect(sock, lambda ms: any("STOPPING=1" in m for m in ms)))
        finally:
            proc.kill()
            proc.wait(5)


def test_the_watchdog_is_only_for_the_process_it_names() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "2000000"}) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None
    assert watchdog_interval({}) is None


def test_notify_outside_systemd_or_to_a_vanished_manager_is_harmless(short_tmp: Path) -> None:
    assert notify("READY=1", {}) is False
    assert notify("READY=1", {"NOTIFY_SOCKET": str(short_tmp / "nobody.sock")}) is False


def start_with_config_dir(root: Path, conf_dir: Path, **extra_env: str) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = root / "daemon.log"
    env = {"CONFIGURATION_DIRECTORY": str(conf_dir), "PATH": "/usr/bin:/bin", "HOME": str(root), **extra_env}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(daemon_argv(root), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, log_path


def wait_for_api(proc: subprocess.Popen[bytes], sock: Path, log_path: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"daemon exited with {proc.returncode}:\n{log_path.read_text()}"
        if sock.exists():
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(sock))
                    return
                except OSError:
                    pass
        time.sleep(0.02)
    raise AssertionError(f"daemon did not start:\n{log_path.read_text()}")


@pytest.mark.parametrize("with_file", [False, True], ids=["no-config-file", "config-file"])
def test_daemon_starts_with_or_without_the_config_directory_file(short_tmp: Path, with_file: bool) -> None:
    conf_dir = short_tmp / "etc"
    conf_dir.mkdir()
    if with_file:
        (conf_dir / "config.toml").write_text('name = "from-etc"\nsecurity_level = "S3"\n')
    proc, log_path = start_with_config_dir(short_tmp, conf_dir)
    try:
        wait_for_api(proc, short_tmp / "api.sock", log_path)
        with BlockingClient(short_tmp / "api.sock") as c:
            info = c.call("device.info")
        if with_file:
            assert (info["name"], info["security_level"]) == ("from-etc", "S3")
            assert f"config: {conf_dir / 'config.toml'}" in log_path.read_text()
        else:
            assert info["security_level"] == "S1"
            assert "no config file (defaults and flags)" in log_path.read_text()
    finally:
        proc.terminate()
        proc.wait(15)


def test_a_bad_config_file_is_one_line_on_stderr_not_a_traceback(short_tmp: Path) -> None:
    conf_dir = short_tmp / "etc"
    conf_dir.mkdir()
    (conf_dir / "config.toml").write_text("port = \"many\"\n")
    proc, log_path = start_with_config_dir(short_tmp, conf_dir)
    assert proc.wait(30) == 1
    out = log_path.read_text().strip()
    assert "Traceback" not in out and len(out.splitlines()) == 1, out
    assert out.startswith("p2pstore: CONFIG_INVALID: ") and "config.toml: port" in out, out


def test_under_the_journal_log_lines_carry_a_priority_and_no_timestamp(short_tmp: Path) -> None:
    log_path = short_tmp / "daemon.log"
    log_path.touch()
    st = os.stat(log_path)  # the daemon's stderr is this file: JOURNAL_STREAM names it as journald would
    proc, _ = start_with_config_dir(short_tmp, short_tmp, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    try:
        wait_for_api(proc, short_tmp / "api.sock", log_path)
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
    lines = log_path.read_text().splitlines()
    assert lines and all(line.startswith(("<6>INFO p2pstore.", "<4>WARNING p2pstore.", "<7>DEBUG ")) for line in lines), lines
    assert any("listening on" in line for line in lines)


def test_the_journal_format_folds_a_traceback_onto_one_line() -> None:
    import logging

    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("p2pstore.x").makeRecord("p2pstore.x", logging.ERROR, __file__, 1, "it failed", (), sys.exc_info())
    text = JournalFormatter().format(record)
    assert "\n" not in text and text.startswith("<3>ERROR p2pstore.x: it failed | Traceback") and text.endswith("ValueError: boom")


def _service_manager() -> str | None:
    """Why no real systemd can run the unit here, or None if one can."""
    if shutil.which("systemctl") is None:
        return "systemctl not installed"
    state = subprocess.run(["systemctl", "is-system-running"], capture_output=True, text=True, timeout=30).stdout.strip()
    if state not in ("running", "degraded"):
        return f"no running service manager (systemctl is-system-running: {state or 'no answer'})"
    if os.geteuid() != 0:
        return "installing a system unit needs root"
    return None


@pytest.mark.skipif(_service_manager() is not None, reason=str(_service_manager()))
def test_the_unit_starts_under_systemd_without_a_config_file() -> None:
    exe = Path(sys.executable).parent / "p2pstore"
    name = f"p2pstore-test-{secrets.token_hex(4)}"
    unit = Path("/run/systemd/system") / f"{name}.service"
    # The installed unit (a dynamic user), with this venv's executable and its
    # own directories, so it can't meet a real installation.
    text = (UNIT.read_text().replace("/usr/local/bin/p2pstore", str(exe))
            .replace("Directory=p2pstore\n", f"Directory={name}\n")
            .replace("ProtectHome=yes", "ProtectHome=read-only"))  # the venv may live under /root
    unit.write_text(text)
    try:
        subprocess.run(["systemctl", "daemon-reload"], check=True, timeout=60)
        subprocess.run(["systemctl", "start", name], check=True, timeout=120)  # Type=notify: returns after READY=1
        shown = subprocess.run(["systemctl", "show", name, "-p", "ActiveState", "-p", "StatusText"],
                               capture_output=True, text=True, check=True, timeout=30).stdout
        assert "ActiveState=active" in shown and "trusted peer(s) online" in shown, shown
    finally:
        subprocess.run(["systemctl", "stop", name], timeout=60)
        unit.unlink(missing_ok=True)
        subprocess.run(["systemctl", "daemon-reload"], timeout=60)
