"""The systemd unit verifies, and the daemon speaks sd_notify (Type=notify)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

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
