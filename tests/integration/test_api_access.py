"""Who may use the API socket: file mode 0600 (0660 with a group) and the
caller's uid from SO_PEERCRED against the allow-list (own uid, root, config).

The tests run as root and fork a child that drops to ``nobody`` (65534)
before it connects, so SO_PEERCRED really reports another uid.
"""

from __future__ import annotations

import grp
import json
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from p2ps_helpers import DaemonProcess, wait_for, write_config

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")


def connect_as_nobody(path: Path, *, gid: int = NOBODY, timeout: float = 5.0) -> dict[str, object]:
    """Fork; the child becomes nobody, connects, sends device.info and reports what happened."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery from here on, always _exit
        result: dict[str, object] = {}
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(NOBODY)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(str(path))
            except OSError as exc:
                result = {"connect_error": exc.errno}
            else:
                result["connected"] = True
                try:
                    sock.sendall(b'{"jsonrpc": "2.0", "id": 1, "method": "device.info"}\n')
                except OSError as exc:
                    result["send_error"] = exc.errno
                data = b""
                try:
                    while b"\n" not in data:
                        chunk = sock.recv(65536)
                        if not chunk:
                            result["closed"] = True
                            break
                        data += chunk
                except TimeoutError:
                    result["timeout"] = True
                except OSError as exc:
                    result["recv_error"] = exc.errno
                    result["closed"] = True
                result["answer"] = data.decode(errors="replace")
        except BaseException as exc:  # report, never raise in the child
            result["child_error"] = repr(exc)
        os.write(write_fd, json.dumps(result).encode())
        os._exit(0)
    os.close(write_fd)
    chunks = []
    while True:
        chunk = os.read(read_fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_fd)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks))


@pytest.fixture
def open_dir(start_daemon: Callable[..., DaemonProcess]) -> Callable[..., DaemonProcess]:
    """Start a daemon whose directory other users may traverse (the temp root is 0700)."""

    def start(name: str, *flags: str) -> DaemonProcess:
        d = start_daemon(name, *flags)
        os.chmod(d.root, 0o711)
        return d

    return start


def test_socket_file_is_0600_and_owned_by_the_daemon_user(shared_daemon: DaemonProcess) -> None:
    st = shared_daemon.socket.stat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()


def test_another_user_cannot_even_open_the_0600_socket(open_dir: Callable[..., DaemonProcess]) -> None:
    d = open_dir("private")
    result = connect_as_nobody(d.socket)
    assert result.get("connect_error") == 13, result  # EACCES
    with d.client() as c:
        assert c.call("device.info")["name"] == "private"


def test_a_uid_outside_the_allow_list_gets_no_answer(open_dir: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    # With a socket group the file is 0660, so nobody (group nogroup) can connect:
    # only the SO_PEERCRED check stands between it and the API.
    config = write_config(tmp_path, 'socket_group = "nogroup"\n')
    d = open_dir("grouped", "--config", str(config))
    st = d.socket.stat()
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == grp.getgrnam("nogroup").gr_gid
    with d.client() as root_client:
        result = connect_as_nobody(d.socket)
        assert result.get("connected") is True, result
        assert result.get("closed") is True and result.get("answer") == "", result
        # The daemon keeps serving root, on an existing and on a new connection.
        assert root_client.call("device.info")["name"] == "grouped"
    with d.client() as again:
        assert again.call("status")["device"]["name"] == "grouped"
    assert d.proc is not None and d.proc.poll() is None
    wait_for(lambda: f"refused API connection from uid {NOBODY}" in d.log())


def test_allowed_uids_admit_another_user(open_dir: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    config = write_config(tmp_path, f'socket_group = "nogroup"\nallowed_uids = [{NOBODY}]\n')
    d = open_dir("shared-with-nobody", "--config", str(config))
    result = connect_as_nobody(d.socket)
    answer = json.loads(str(result.get("answer") or "{}"))
    assert answer.get("result", {}).get("name") == "shared-with-nobody", result
