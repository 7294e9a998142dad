"""p2pstore demo: real daemons in a temp dir, driven through the API and CLI.

Everything here is what a user would type or call; it exits non-zero if any
step does not behave as shown.
"""

from __future__ import annotations

import json
import shutil
import socket
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


def wait_for(what: str, check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def device(c: BlockingClient, device_id: str) -> dict | None:
    return next((d for d in c.call("devices.list") if d["device_id"] == device_id), None)


EMPLOYEE = "CREATE TABLE EMPLOYEE (ID INTEGER PRIMARY KEY AUTOINCREMENT, NAME TEXT NOT NULL UNIQUE, AGE INTEGER, SALARY REAL, CODES BLOB)"


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="p2ps-demo-", dir="/tmp"))
    daemons: list[Daemon] = []
    try:
        step("start two daemons (two devices) with mDNS on 127.0.0.1")
        for name in ("shop-a", "shop-b"):
            (root / name).mkdir(mode=0o700)
            shutil.copy(REPO / "sync_schema.json", root / name / "sync_schema.json")  # for single-version tables
        a = Daemon(root, "shop-a", "--interface", "127.0.0.1")
        b = Daemon(root, "shop-b", "--interface", "127.0.0.1")
        daemons += [a, b]
        ca, cb = BlockingClient(a.socket), BlockingClient(b.socket)
        ida, idb = ca.call("device.info")["device_id"], cb.call("device.info")["device_id"]
        show("shop-a", ida)
        show("shop-b", idb)

        step("they discover each other over mDNS: listed as pending (not trusted, no channel)")
        t0 = time.monotonic()
        wait_for("discovery", lambda: device(ca, idb) and device(cb, ida))
        show(f"found in {time.monotonic() - t0:.1f} s; shop-a sees", device(ca, idb))
        cli(a.socket, "devices")

        step("trust both ways (the user accepts the other device's ID); the TLS channel opens")
        cli(a.socket, "trust", idb)
        cli(b.socket, "trust", ida)
        t0 = time.monotonic()
        wait_for("online", lambda: (device(ca, idb) or {}).get("online") and (device(cb, ida) or {}).get("online"))
        show("online both ways after", f"{time.monotonic() - t0:.2f} s")
        cli(a.socket, "devices")

        step("collaborative mode: each device keeps its own rows; the other's arrive in a read-only table")
        for c in (ca, cb):
            c.call("store.open", store="notes")
            c.call("store.execute", store="notes", sql="CREATE TABLE NOTE (ID INTEGER PRIMARY KEY, TEXT TEXT)")
            c.call("store.set_distributed_tables", store="notes", tables=["NOTE"])
        cb.call("store.subscribe", store="notes", type="remote")
        ca.call("store.insert", store="notes", table="NOTE", values={"TEXT": "from a: open at 9"})
        cb.call("store.insert", store="notes", table="NOTE", values={"TEXT": "from b: closed on Monday"})
        show("a pushes to b", ca.call("store.sync", store="notes", mode="push", predicates={"devices": [idb]})["results"])
        show("b's remote subscriber gets", cb.next_notification(timeout=5)["params"])
        show("a pulls from b", ca.call("store.sync", store="notes", mode="pull", predicates={"devices": [idb]})["results"])
        for c, other, label in ((ca, idb, "a"), (cb, ida, "b")):
            table = c.call("store.distributed_table_name", store="notes", device=other, table="NOTE")["table"]
            show(f"on {label}, {table}", c.call("store.query", store="notes", sql=f"SELECT TEXT FROM {table}")["rows"])
        try:
            cb.call("store.insert", store="notes", table=table, values={"TEXT": "forged"})
        except Exception as exc:  # noqa: BLE001 - showing the error is the point
            show("writing the other device's table", f"{type(exc).__name__}: {exc}")

        step("single-version mode (the seed's EMPLOYEE, sync_schema.json): rows merge into one table by NAME")
        for c in (ca, cb):
            c.call("store.open", store="RdbTest", bundle="com.example.rdbDataSync", security_level="S1")
            c.call("store.execute", store="RdbTest", bundle="com.example.rdbDataSync", sql=EMPLOYEE)
            result = c.call("store.set_distributed_tables", store="RdbTest", bundle="com.example.rdbDataSync",
                            tables=["EMPLOYEE"], config={"table_type": "single_version", "auto_sync": False})
        show("schema accepted", result)
        ref = {"store": "RdbTest", "bundle": "com.example.rdbDataSync"}
        ca.call("store.insert", **ref, table="EMPLOYEE", values={"NAME": "Lisa", "AGE": 18, "SALARY": 100.5, "CODES": b"\x01"})
        cb.call("store.insert", **ref, table="EMPLOYEE", values={"NAME": "Rose", "AGE": 22, "SALARY": 200.0})
        show("a pushes", ca.call("store.sync", **ref, mode="push", predicates={"devices": [idb]})["results"])
        show("b pushes", cb.call("store.sync", **ref, mode="push", predicates={"devices": [ida]})["results"])
        step("concurrent edits of different columns of one row both survive (per-column last writer wins)")
        ca.call("store.update", **ref, values={"AGE": 19}, predicates={"table": "EMPLOYEE", "where": [["NAME", "=", "Lisa"]]})
        cb.call("store.update", **ref, values={"SALARY": 150.0}, predicates={"table": "EMPLOYEE", "where": [["NAME", "=", "Lisa"]]})
        ca.call("store.sync", **ref, mode="push", predicates={"devices": [idb]})
        ca.call("store.sync", **ref, mode="pull", predicates={"devices": [idb]})
        rows = {}
        for c, label in ((ca, "a"), (cb, "b")):
            rows[label] = c.call("store.query", **ref, sql="SELECT NAME, AGE, SALARY FROM EMPLOYEE ORDER BY NAME")["rows"]
            show(f"EMPLOYEE on {label}", rows[label])
        assert rows["a"] == rows["b"] == [["Lisa", 19, 150.0], ["Rose", 22, 200.0]], rows

        step("remote query: ask shop-b for its rows (shop-b compiles the predicate and checks trust and level)")
        result = ca.call("store.remote_query", **ref, device=idb, table="EMPLOYEE", columns=["NAME", "AGE"],
                         predicates={"where": [["AGE", ">", 20]], "order_by": [["AGE", "desc"]]})
        show("rows on shop-b with AGE > 20", result)
        assert result["rows"] == [["Rose", 22]], result
        cli(a.socket, "query", "--store", "RdbTest", "--bundle", "com.example.rdbDataSync", "--remote", idb, "EMPLOYEE",
            "--columns", "NAME,SALARY", "--where", "SALARY >= 150")

        step("live notification: shop-b watches; shop-a writes with auto-sync on; shop-b is told")
        for c in (ca, cb):
            c.call("store.set_distributed_tables", **ref, tables=["EMPLOYEE"], config={"table_type": "single_version", "auto_sync": True})
        cb.call("store.subscribe", **ref, type="remote_details")
        ca.call("store.insert", **ref, table="EMPLOYEE", values={"NAME": "Mia", "AGE": 30, "SALARY": 300.0})
        deadline = time.monotonic() + 10
        while True:  # skip progress notes of the earlier syncs; wait for the dataChange
            note = cb.next_notification(timeout=max(0.1, deadline - time.monotonic()))
            if note["method"] == "dataChange" and "changes" in note["params"]:
                break
        show("shop-b got", note["params"])
        assert note["params"]["changes"][0]["origin"] == ida
        rows = cb.call("store.query", **ref, sql="SELECT NAME, AGE FROM EMPLOYEE ORDER BY NAME")["rows"]
        show("EMPLOYEE on b", rows)
        assert ["Mia", 30] in rows, rows

        step("the same through the CLI")
        cli(a.socket, "sync", "--store", "RdbTest", "--bundle", "com.example.rdbDataSync", "--push", "--all")
        cli(a.socket, "status")
        print("\ndemo finished: every step behaved as shown")
        return 0
    finally:
        for d in daemons:
            d.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
