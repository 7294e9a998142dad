"""The JSON Schemas p2pstore checks its inputs against, and their one loader.

The ``*.json`` files beside this module are package data, so a wheel or a
plain ``pip install .`` carries them (the repository's top-level ``schemas/``
is a symlink to this folder: one copy). ``config`` (the TOML file),
``api.methods`` (request params) and ``schema.sync_schema`` (sync_schema.json)
all load through :func:`load_json_schema`. Pure: json and importlib only.
"""

from __future__ import annotations

import json
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

from p2pstore.errors import ConfigError

SCHEMAS_DIR: Traversable = resources.files(__name__)


def load_json_schema(name: str) -> dict[str, Any]:
    """One of the package's JSON Schemas, e.g. ``"config.schema.json"``."""
    path = SCHEMAS_DIR / name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"JSON Schema {path} is missing from the installed package: reinstall p2pstore") from exc
