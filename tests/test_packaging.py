"""A wheel, installed the way a user installs it, gives a working p2pstore.

``python -m build`` makes an sdist and a wheel from it; the wheel goes into a
fresh venv in a temp dir (pip resolves the dependencies from the index pip is
configured with, as on any machine). Everything then runs from that venv with
a temp cwd and no PYTHONPATH, so nothing from the source tree can leak in: the
daemon starts (it needs the JSON Schemas, which must be package data), answers
``p2pstore status``, and checks a sync_schema.json.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def run(argv: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def clean_env(home: Path) -> dict[str, str]:
    """The caller's environment minus anything that points Python at the source tree."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "P2PSTORE_SOCKET", "NOTIFY_SOCKET")}
    env["HOME"] = str(home)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    result = run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)], cwd=out, env=dict(os.environ), timeout=500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    wheels = list(out.glob("p2pstore-*.whl"))
    assert len(wheels) == 1, list(out.iterdir())
    assert list(out.glob("p2pstore-*.tar.gz")), "python -m build also makes the sdist"
    return wheels[0]


def test_the_wheel_installed_in_a_fresh_venv_runs_the_daemon(wheel: Path, short_tmp: Path) -> None:
    work = short_tmp / "cwd"
    work.mkdir()
    env = clean_env(short_tmp)
    venv = short_tmp / "venv"
    made = run([sys.executable, "-m", "venv", str(venv)], cwd=work, env=env)
    assert made.returncode == 0, made.stderr
    py, exe = venv / "bin" / "python", venv / "bin" / "p2pstore"
    installed = run([str(py), "-m", "pip", "install", "--quiet", str(wheel)], cwd=work, env=env, timeout=500)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]

    # The package (and its schemas) come from the venv's site-packages, not the repo.
    where = run([str(py), "-c", "import json, sysconfig, p2pstore, p2pstore.schemas as s; "
                 "print(json.dumps([p2pstore.__file__, sysconfig.get_path('purelib'), "
                 "sorted(p.name for p in s.SCHEMAS_DIR.iterdir() if p.name.endswith('.json'))]))"],
                cwd=work, env=env)
    assert where.returncode == 0, where.stderr
    module_file, purelib, schemas = json.loads(where.stdout)
    assert Path(module_file).is_relative_to(purelib) and Path(purelib).is_relative_to(venv), (module_file, purelib)
    assert schemas == ["api.schema.json", "config.schema.json", "sync_schema.schema.json"]
    freeze = run([str(py), "-m", "pip", "freeze"], cwd=work, env=env).stdout.lower()
    assert "anyio" not in freeze, "anyio is not a dependency (nothing imports it)"

    if shutil.which("systemd-analyze"):
        # The unit as shipped, pointed at where this install put the command.
        unit = short_tmp / "p2pstore.service"
        unit.write_text((REPO / "systemd" / "p2pstore.service").read_text().replace("/usr/local/bin/p2pstore", str(exe)))
        verify = run(["systemd-analyze", "verify", str(unit)], cwd=work, env=env, timeout=60)
        assert verify.returncode == 0 and "p2pstore.service" not in verify.stderr, verify.stderr

    sock = short_tmp / "api.sock"
    log_path = short_tmp / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(exe), "daemon", "--data-dir", str(short_tmp / "data"), "--socket", str(sock), "--port", "0",
             "--no-discovery", "--name", "wheel"],
            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the installed daemon exited with {proc.returncode}:\n{log_path.read_text()}"
            if sock.exists():
                status = run([str(exe), "status", "--json", "--socket", str(sock)], cwd=work, env=env, timeout=30)
                if status.returncode == 0:
                    break
            time.sleep(0.05)
        assert status is not None and status.returncode == 0, log_path.read_text()
        info = json.loads(status.stdout)
        assert info["device"]["name"] == "wheel", info

        good = work / "sync_schema.json"
        shutil.copy(REPO / "sync_schema.json", good)
        valid = run([str(exe), "schema", "validate", "--socket", str(sock), str(good)], cwd=work, env=env, timeout=30)
        assert valid.returncode == 0, valid.stdout + valid.stderr
        bad = work / "bad.json"
        doc = json.loads(good.read_text())
        doc["dbSchema"][0]["tables"][0]["fields"][0]["type"] = "Varchar"
        bad.write_text(json.dumps(doc))
        invalid = run([str(exe), "schema", "validate", "--socket", str(sock), str(bad)], cwd=work, env=env, timeout=30)
        assert invalid.returncode == 1 and "/dbSchema/0/tables/0/fields/0/type" in invalid.stdout + invalid.stderr, (
            invalid.stdout + invalid.stderr)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(20) == 0, log_path.read_text()
        finally:
            proc.kill()
            proc.wait(5)
