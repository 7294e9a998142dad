"""The command line (``python -m p2pstore ...`` as a subprocess) against a
real daemon: output, --json, exit codes 0 / 1 / 2, --help of every command."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from p2ps_helpers import REPO, DaemonProcess, unique

from p2pstore.cli.main import build_parser

PY = [sys.executable, "-m", "p2pstore"]
#: ``PY`` with SIGINT back to Python's default handler, whatever the suite inherited.
SIGINT_PY = [sys.executable, "-c", "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "sys.argv[0] = 'p2pstore'; runpy.run_module('p2pstore', run_name='__main__', alter_sys=True)"]


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PY, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def sock(shared_daemon: DaemonProcess) -> str:
    return str(shared_daemon.socket)


@pytest.fixture
def store(sock: str) -> str:
    name = unique("cli")
    assert cli("sql", "--socket", sock, "--store", name,
               "CREATE TABLE T (id INTEGER PRIMARY KEY, name TEXT, n)").returncode == 0
    return name


# -- id / status ------------------------------------------------------------------------------------

def test_id_prints_the_device_id(sock: str, api) -> None:  # type: ignore[no-untyped-def]
    result = cli("id", "--socket", sock)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.strip() == api.call("device.info")["device_id"]
    as_json = json.loads(cli("id", "--socket", sock, "--json").stdout)
    assert as_json == api.call("device.info")


def test_status(sock: str, store: str, shared_daemon: DaemonProcess) -> None:
    text = cli("status", "--socket", sock)
    assert text.returncode == 0
    assert shared_daemon.name in text.stdout and store in text.stdout
    data = json.loads(cli("status", "--json", "--socket", sock).stdout)
    assert data["device"]["name"] == shared_daemon.name
    assert store in [s["store"] for s in data["stores"]]


def test_socket_from_the_environment(sock: str) -> None:
    result = cli("id", env={"P2PSTORE_SOCKET": sock})
    assert result.returncode == 0 and result.stdout.strip()


# -- sql ------------------------------------------------------------------------------------------------

def test_sql_statement_with_params(sock: str, store: str) -> None:
    result = cli("sql", "--socket", sock, "--store", store, "INSERT INTO T(name, n) VALUES (?, ?)", "alice", "42")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "rows_affected=1 last_insert_rowid=1"
    as_json = cli("sql", "--socket", sock, "--store", store, "--json", "INSERT INTO T(name, n) VALUES (?, ?)", '"42"', "null")
    assert json.loads(as_json.stdout) == {"rows_affected": 1, "last_insert_rowid": 2}


def test_sql_params_are_json_when_they_parse(sock: str, store: str) -> None:
    cli("sql", "--socket", sock, "--store", store, "INSERT INTO T(name, n) VALUES (?, ?)", "x", "1.5")
    cli("sql", "--socket", sock, "--store", store, "INSERT INTO T(name, n) VALUES (?, ?)", '"7"', "[1]")
    got = json.loads(cli("sql", "--socket", sock, "--store", store, "--json", "SELECT name, n, typeof(n) FROM T ORDER BY id").stdout)
    assert got["rows"] == [["x", 1.5, "real"], ["7", "[1]", "text"]]


def test_sql_query_prints_rows(sock: str, store: str) -> None:
    cli("sql", "--socket", sock, "--store", store, "INSERT INTO T(name) VALUES ('bob'), ('cid')")
    result = cli("sql", "--socket", sock, "--store", store, "SELECT id, name, n FROM T ORDER BY id")
    assert result.returncode == 0
    assert result.stdout.splitlines() == ["id\tname\tn", "1\tbob\tNULL", "2\tcid\tNULL"]
    as_json = json.loads(cli("sql", "--socket", sock, "--store", store, "--json", "SELECT name FROM T WHERE id = ?", "2").stdout)
    assert as_json == {"columns": ["name"], "rows": [["cid"]]}


def test_sql_blobs_print_as_blob_objects(sock: str, store: str) -> None:
    result = cli("sql", "--socket", sock, "--store", store, "--json", "SELECT x'00ff'")
    assert json.loads(result.stdout)["rows"] == [[{"$blob": "AP8="}]]


def test_sql_uses_the_default_store(sock: str, api) -> None:  # type: ignore[no-untyped-def]
    table = unique("t")
    assert cli("sql", "--socket", sock, f"CREATE TABLE {table} (a)").returncode == 0
    default = api.call("device.info")["default_store"]
    api.call("store.open", store=default)
    assert api.call("store.query", store=default, sql=f"SELECT count(*) FROM {table}")["rows"] == [[0]]


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (["SELEC 1"], "SQL_ERROR"),
        (["BEGIN"], "PERMISSION_DENIED"),
        (["SELECT * FROM missing"], "SQL_ERROR"),
    ],
)
def test_sql_errors_exit_1_with_the_error_on_stderr(sock: str, store: str, args: list[str], name: str) -> None:
    result = cli("sql", "--socket", sock, "--store", store, *args)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"p2pstore: {name}: ")


def test_empty_statement_is_bad_usage(sock: str) -> None:
    assert cli("sql", "--socket", sock, "  ").returncode == 2


# -- distribute / watch ----------------------------------------------------------------------------------

def test_distribute(sock: str, store: str, api) -> None:  # type: ignore[no-untyped-def]
    result = cli("distribute", "--socket", sock, "--store", store, "T")
    assert result.returncode == 0, result.stderr
    assert "T" in result.stdout
    mine = [s for s in api.call("status")["stores"] if s["store"] == store][0]
    assert mine["distributed_tables"] == ["T"] and mine["table_type"] == "collaborative"
    as_json = json.loads(cli("distribute", "--socket", sock, "--store", store, "--json", "T", "--auto-sync").stdout)
    assert as_json["auto_sync"] is True and as_json["tables"] == ["T"]


def test_distribute_errors(sock: str, store: str) -> None:
    cli("sql", "--socket", sock, "--store", store, "CREATE TABLE C (a INTEGER, b INTEGER, PRIMARY KEY (a, b))")
    result = cli("distribute", "--socket", sock, "--store", store, "C")
    assert result.returncode == 1 and "COMPOSITE_KEY_NOT_SUPPORTED" in result.stderr
    result = cli("distribute", "--socket", sock, "--store", store, "missing")
    assert result.returncode == 1 and "TABLE_NOT_FOUND" in result.stderr
    assert cli("distribute", "--socket", sock, "--store", store, "T", "--mode", "bogus").returncode == 2


@pytest.fixture
def watcher(sock: str, store: str) -> Iterator[subprocess.Popen[str]]:
    assert cli("distribute", "--socket", sock, "--store", store, "T").returncode == 0
    # Ctrl-C ends watch; a suite started as a background job (``./scripts/test &``)
    # hands its children SIGINT ignored, as POSIX shells do, so restore it first.
    proc = subprocess.Popen([*SIGINT_PY, "watch", "--socket", sock, "--store", store, "--local"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=10)


def test_watch_local_prints_notifications_as_json_lines(watcher: subprocess.Popen[str], sock: str, store: str, api) -> None:  # type: ignore[no-untyped-def]
    assert watcher.stdout is not None
    header = json.loads(watcher.stdout.readline())  # printed once subscribed
    assert header == {"watching": store, "types": ["local_details"]}
    api.call("store.open", store=store)
    api.call("store.insert", store=store, table="T", values={"id": 77, "name": "seen"})
    line = watcher.stdout.readline()
    note = json.loads(line)
    assert note["method"] == "dataChange"
    assert note["params"]["store"] == store
    assert note["params"]["changes"] == [{"table": "T", "type": "data", "inserted": [77], "updated": [], "deleted": []}]
    watcher.send_signal(signal.SIGINT)
    assert watcher.wait(timeout=10) == 0


# -- exit codes and usage -------------------------------------------------------------------------------------

def test_no_daemon_is_exit_1(short_tmp: Path) -> None:
    result = cli("id", "--socket", str(short_tmp / "none.sock"))
    assert result.returncode == 1
    assert "DAEMON_NOT_RUNNING" in result.stderr and "none.sock" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [[], ["no-such-command"], ["id", "--no-such-option"], ["sql"], ["watch", "--local", "--remote"], ["distribute"]],
    ids=["no command", "unknown command", "unknown option", "missing argument", "exclusive options", "no tables"],
)
def test_bad_usage_is_exit_2(args: list[str], sock: str) -> None:
    result = cli(*args, *(["--socket", sock] if args and args[0] not in ("no-such-command",) else []))
    assert result.returncode == 2, result
    assert result.stderr.strip(), "a usage error says what is wrong"
    assert result.stdout == ""


def every_command(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from every_command(sub, (*prefix, name))


COMMANDS = [(), *every_command(build_parser())]


def test_help_of_every_command_exits_0() -> None:
    assert {"daemon", "id", "status", "sql", "distribute", "watch"} <= {c[0] for c in COMMANDS if c}
    procs = {
        cmd: subprocess.Popen([*PY, *cmd, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        for cmd in COMMANDS
    }
    failures = []
    for cmd, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        if proc.returncode != 0 or "usage:" not in out:
            failures.append(f"{' '.join(cmd) or '(none)'}: exit {proc.returncode} {err[-300:]}")
    assert not failures, failures


def test_version() -> None:
    from p2pstore import __version__

    result = cli("--version")
    assert result.returncode == 0 and __version__ in result.stdout


# -- evolutions -------------------------------------------------------------------------------------

def test_evolutions_status_apply_resolve_and_log_through_the_cli(sock: str, shared_daemon: DaemonProcess) -> None:
    store = unique("evo")
    scripts = shared_daemon.data_dir / "evolutions" / "default" / store
    scripts.mkdir(parents=True)
    (scripts / "1.sql").write_text("-- Items\n-- !Ups\nCREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT);\n-- !Downs\nDROP TABLE items;\n")
    (scripts / "2.sql").write_text("-- Price\n-- !Ups\nALTER TABLE items ADD COLUMN price REAL;\nINSERT INTO nowhere VALUES (1);\n")
    base = ("--socket", sock, "--store", store)
    status = json.loads(cli("evolutions", "status", *base, "--json").stdout)
    assert status["directory"] == str(scripts)
    assert [(r["id"], r["state"], r["description"]) for r in status["revisions"]] == [(1, "pending", "Items"), (2, "pending", "Price")]

    failed = cli("evolutions", "apply", *base)
    assert failed.returncode == 1 and "EVOLUTION_FAILED" in failed.stderr and "nowhere" in failed.stderr
    text = cli("evolutions", "status", *base)
    assert text.returncode == 1 and "applying_up" in text.stdout and "INCONSISTENT" in text.stdout
    again = cli("evolutions", "apply", *base)
    assert again.returncode == 1 and "EVOLUTION_INCONSISTENT" in again.stderr

    (scripts / "2.sql").write_text("-- Price\n-- !Ups\nALTER TABLE items ADD COLUMN price REAL;\n")  # the fix
    fixed = cli("evolutions", "apply", *base)
    assert fixed.returncode == 0 and "applied revision(s) 2" in fixed.stdout
    assert [r["state"] for r in json.loads(cli("evolutions", "status", *base, "--json").stdout)["revisions"]] == ["applied", "applied"]
    assert cli("sql", *base, "INSERT INTO items(name, price) VALUES ('x', 2.5)").returncode == 0
    log = json.loads(cli("evolutions", "log", *base, "--json").stdout)
    assert [(e["id"], e["state"]) for e in log] == [(1, "applied"), (2, "applied")]
    assert "ADD COLUMN price" in log[1]["apply_script"]
    refused = cli("evolutions", "resolve", *base, "2")
    assert refused.returncode == 1 and "EVOLUTION_INVALID" in refused.stderr
