"""Real storage faults for tests: a tiny tmpfs that fills up, a read-only
bind mount. Both need root (``mount``); tests skip with the reason otherwise.

Root passes every permission check, so "read-only" here is a real
read-only mount, never chmod.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

NEEDS_ROOT = "needs root: mounts a tmpfs / a read-only bind mount (root ignores permission bits)"


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip(NEEDS_ROOT)


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def _unmount(path: Path) -> None:
    try:
        _run("umount", str(path))
    except subprocess.CalledProcessError:
        _run("umount", "-l", str(path))  # still busy (a daemon's open file): detach it anyway


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. "2m") mounted at ``path``; unmounted after."""
    require_root()
    path.mkdir(parents=True, exist_ok=True)
    _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path))
    try:
        yield path
    finally:
        _unmount(path)


def resize_tmpfs(path: Path, size: str) -> None:
    """Give a full tmpfs room again (space returns)."""
    _run("mount", "-o", f"remount,size={size}", str(path))


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """``path`` (a directory) bind-mounted read-only onto itself; undone after."""
    require_root()
    _run("mount", "--bind", str(path), str(path))
    try:
        _run("mount", "-o", "remount,bind,ro", str(path))
        yield path
    finally:
        _unmount(path)
