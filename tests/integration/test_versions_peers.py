"""``versions diff --device`` (issue 12 item 3), with two real daemons: our
sync schema against a peer's offer, under the security-level rule."""

from __future__ import annotations

import json

import pytest

from sync_helpers import SV_REF, cli, linked_daemons, schema_doc, setup_employee, wait_until  # noqa: F401  (linked_daemons: a fixture)

from p2pstore.errors import DeviceOffline, SecurityLevelDenied

DEPT_FIELD = {"columnName": "DEPT", "type": "Text", "primaryKey": False, "notNull": False, "autoIncrement": False}
EMPLOYEE_V1 = ("CREATE TABLE EMPLOYEE (ID INTEGER PRIMARY KEY AUTOINCREMENT, NAME TEXT NOT NULL UNIQUE, AGE INTEGER, "
               "SALARY REAL, CODES BLOB, DEPT TEXT)")


def test_a_diff_against_a_device_names_the_sync_column_it_has_and_we_lack(linked_daemons) -> None:
    v1 = schema_doc(1, ("NAME", "AGE", "SALARY", "CODES", "DEPT"), [DEPT_FIELD])
    a, b = linked_daemons(2, schema={0: v1, 1: schema_doc(0)},
                          flags={0: ["--security-level", "S2"], 1: ["--security-level", "S1"]})
    setup_employee(a, create=EMPLOYEE_V1)
    setup_employee(b)

    def offered(node, other):  # the peer's offer arrives shortly after its tables are distributed
        try:
            return node.call("versions.diff", **SV_REF, device=other.id)
        except DeviceOffline:
            return None

    d = wait_until(lambda: offered(b, a), 10, "A's offer of the store reaches B")
    assert d["sync_columns_added"] == [{"table": "EMPLOYEE", "column": "DEPT"}] and d["sync_columns_removed"] == []
    assert d["distributed_added"] == d["distributed_removed"] == d["conflict_column_changed"] == []
    text = cli(b, "versions", "diff", "--store", SV_REF["store"], "--bundle", SV_REF["bundle"], "--device", a.id)
    assert text.returncode == 0 and "+ sync column EMPLOYEE.DEPT" in text.stdout, text
    back = wait_until(lambda: offered(a, b), 10, "B's offer of the store reaches A")
    assert back["sync_columns_removed"] == [{"table": "EMPLOYEE", "column": "DEPT"}]

    # A store labelled above the device's level is neither shown nor compared.
    a.call("store.open", **SV_REF, security_level="S2")
    with pytest.raises(SecurityLevelDenied, match="labelled S2"):
        a.call("versions.diff", **SV_REF, device=b.id)
    usage = cli(b, "versions", "diff", "--store", SV_REF["store"], "--bundle", SV_REF["bundle"], "1", "--device", a.id)
    assert usage.returncode == 2 and "not both" in usage.stderr
    listed = json.loads(cli(a, "versions", "list", "--store", SV_REF["store"], "--bundle", SV_REF["bundle"], "--json").stdout)
    assert [(v["kind"], v["ref"]) for v in listed] == [("sync_schema", 1)], "the accepted schema is a version"
