"""p2pstore demo: real daemons in a temp dir, driven through the API and CLI.

Everything here is what a user would type or call; it exits non-zero if any
step does not behave as shown.
"""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from p2pstore.client import BlockingClient  # noqa: E402


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def show(label: str, value: object) -> None:
    print(f"   {label}: {json.dumps(value, default=str)}", flush=True)


def cli(sock: Path, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "p2pstore", *args, "--socket", str(sock)],
                         cwd=REPO, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise SystemExit(f"p2pstore {' '.join(args)} failed: {out.stderr}")
    print("   $ p2pstore " + " ".join(args))
    for line in out.stdout.rstrip().splitlines():
        print("     " + line)
    return out.stdout


class Daemon:
    def __init__(self, root: Path, name: str, *flags: str) -> None:
        self.name = name
        self.socket = root / f"{name}.sock"
        self.log = open(root / f"{name}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "p2pstore", "daemon", "--data-dir", str(root / name), "--socket", str(self.socket),
             "--port", "0", "--name", name, *flags],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"daemon {name} exited: {(root / f'{name}.log').read_text()}")
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(self.socket))
                    return
            except OSError:
                time.sleep(0.05)
        raise SystemExit(f"daemon {name} did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="p2ps-demo-", dir="/tmp"))
    daemons: list[Daemon] = []
    try:
        step("start a daemon (data and socket in a temp dir, no mDNS for this part)")
        a = Daemon(root, "shop-a", "--no-discovery")
        daemons.append(a)
        cli(a.socket, "status")

        step("create a store and a table, make it distributed")
        with BlockingClient(a.socket) as c:
            opened = c.call("store.open", store="shop")
            show("store.open", opened)
            c.call("store.execute", store="shop",
                   sql="CREATE TABLE EMPLOYEE (ID INTEGER PRIMARY KEY AUTOINCREMENT, NAME TEXT NOT NULL, AGE INTEGER, SALARY REAL, CODES BLOB)")
            c.call("store.set_distributed_tables", store="shop", tables=["EMPLOYEE"])
            sub = c.call("store.subscribe", store="shop", type="local_details")
            show("subscribed to local_details", sub)

            step("write through the API; the subscriber gets a local_details notification")
            rowid = c.call("store.insert", store="shop", table="EMPLOYEE",
                           values={"NAME": "Lisa", "AGE": 18, "SALARY": 100.5, "CODES": b"\x01\x02\x03"})["rowid"]
            show("store.insert rowid", rowid)
            note = c.next_notification(timeout=5)
            show("notification", note)
            assert note["params"]["changes"][0]["inserted"] == [rowid]

            step("another program writes the SQLite file directly; the daemon notices")
            outside = sqlite3.connect(opened["path"], timeout=5)
            with outside:
                outside.execute("INSERT INTO EMPLOYEE(NAME, AGE) VALUES ('Rose', 22)")
            outside.close()
            note = c.next_notification(timeout=5)
            show("notification", note)
            assert note["params"]["changes"][0]["inserted"]

            step("read through the API (BLOBs travel as {\"$blob\": base64})")
            rows = c.call("store.query", store="shop", sql="SELECT ID, NAME, AGE, SALARY, CODES FROM EMPLOYEE ORDER BY ID")
            show("columns", rows["columns"])
            for row in rows["rows"]:
                show("row", [v.hex() if isinstance(v, bytes) else v for v in row])
            assert len(rows["rows"]) == 2

        step("the same through the CLI")
        cli(a.socket, "sql", "--store", "shop", "UPDATE EMPLOYEE SET AGE = AGE + 1 WHERE NAME = ?", "Lisa")
        cli(a.socket, "sql", "--store", "shop", "SELECT NAME, AGE FROM EMPLOYEE ORDER BY ID")
        print("\ndemo finished: every step behaved as shown")
        return 0
    finally:
        for d in daemons:
            d.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
