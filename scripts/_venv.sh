# Sourced by scripts/*: create .venv if missing and install the package with
# its test extras when pyproject.toml changed since the last install.
VENV="${P2PSTORE_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
stamp="$VENV/.p2pstore-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
    "$VENV/bin/python" -m pip install --quiet -e ".[test]" >&2
    touch "$stamp"
fi
