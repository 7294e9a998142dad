# Sourced by scripts/*: create .venv if missing and install the package with
# its test extras when pyproject.toml changed since the last install, or when
# the install is another tree's (a venv shared with a git worktree).
VENV="${P2PSTORE_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
stamp="$VENV/.p2pstore-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$(cat "$stamp")" != "$PWD" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
    "$VENV/bin/python" -m pip install --quiet -e ".[test]" >&2
    echo "$PWD" > "$stamp"
fi
