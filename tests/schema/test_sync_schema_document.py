"""Layer 1: parsing the file and the JSON Schema shape, with the duplicate
checks a JSON Schema can't express."""

from __future__ import annotations

import json
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from schema_helpers import issues, load_seed, mutate

from p2pstore.errors import SchemaInvalid
from p2pstore.schema.sync_schema import (
    MAX_DOCUMENT_BYTES,
    json_schema,
    check_shape,
    find_db_entry,
    parse_document,
    validate,
    validate_document,
)

DB = "/dbSchema/0"
T0 = "/dbSchema/0/tables/0"


def valid() -> Any:
    return load_seed("valid_employee")


def test_the_json_schema_is_a_valid_draft_2020_12_schema() -> None:
    schema = json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)


def test_every_seed_example_passes_the_shape_layer() -> None:
    # The seed's wrong examples are wrong by layers 2 and 3, never by shape.
    from schema_helpers import SEED_DIR

    for path in sorted(SEED_DIR.glob("*.json")):
        assert check_shape(json.loads(path.read_text(encoding="utf-8"))) == [], path.name


@pytest.mark.parametrize(
    ("change", "rule", "path"),
    [
        (lambda d: d.update(extra=1), "unknown-key", "/extra"),
        (lambda d: d["dbSchema"][0].update(owner="x"), "unknown-key", f"{DB}/owner"),
        (lambda d: d["dbSchema"][0]["tables"][0].update(syncFields=[]), "unknown-key", f"{T0}/syncFields"),
        (lambda d: d["dbSchema"][0]["tables"][0]["fields"][0].update(primarykey=True), "unknown-key", f"{T0}/fields/0/primarykey"),
        (lambda d: d["dbSchema"][0].pop("version"), "missing-key", DB),
        (lambda d: d["dbSchema"][0].pop("tables"), "missing-key", DB),
        (lambda d: d["dbSchema"][0]["tables"][0].pop("tableName"), "missing-key", T0),
        (lambda d: d["dbSchema"][0]["tables"][0]["fields"][1].pop("type"), "missing-key", f"{T0}/fields/1"),
        (lambda d: d["dbSchema"][0].update(version="1"), "wrong-type", f"{DB}/version"),
        (lambda d: d["dbSchema"][0].update(version=1.0), "wrong-type", f"{DB}/version"),
        (lambda d: d["dbSchema"][0].update(version=True), "wrong-type", f"{DB}/version"),
        (lambda d: d["dbSchema"][0].update(version=-1), "negative-version", f"{DB}/version"),
        (lambda d: d["dbSchema"][0].update(bundleName=7), "wrong-type", f"{DB}/bundleName"),
        (lambda d: d["dbSchema"][0].update(bundleName=""), "empty-value", f"{DB}/bundleName"),
        (lambda d: d["dbSchema"][0].update(dbName=""), "empty-value", f"{DB}/dbName"),
        (lambda d: d["dbSchema"][0].update(dbName="RdbTest.db"), "db-name-extension", f"{DB}/dbName"),
        (lambda d: d["dbSchema"][0].update(tables=[]), "empty-value", f"{DB}/tables"),
        (lambda d: d["dbSchema"][0].update(tables={}), "wrong-type", f"{DB}/tables"),
        (lambda d: d.update(dbSchema=[]), "empty-value", "/dbSchema"),
        (lambda d: d["dbSchema"][0]["tables"][0].update(deviceSyncFields="NAME"), "wrong-type", f"{T0}/deviceSyncFields"),
        (lambda d: d["dbSchema"][0]["tables"][0]["deviceSyncFields"].append(3), "wrong-type", f"{T0}/deviceSyncFields/4"),
        (lambda d: d["dbSchema"][0]["tables"][0].update(fields=[]), "empty-value", f"{T0}/fields"),
        (lambda d: d["dbSchema"][0]["tables"][0]["fields"][1].update(type="String"), "unknown-field-type", f"{T0}/fields/1/type"),
        (lambda d: d["dbSchema"][0]["tables"][0]["fields"][1].update(type="text"), "unknown-field-type", f"{T0}/fields/1/type"),
        (lambda d: d["dbSchema"][0]["tables"][0]["fields"][1].update(primaryKey="true"), "wrong-type", f"{T0}/fields/1/primaryKey"),
        (lambda d: d["dbSchema"][0]["tables"][0]["fields"][1].update(notNull=1), "wrong-type", f"{T0}/fields/1/notNull"),
        (lambda d: d["dbSchema"][0]["tables"][0]["fields"][1].update(autoIncrement=None), "wrong-type", f"{T0}/fields/1/autoIncrement"),
    ],
)
def test_shape_errors_name_rule_and_path(change: Any, rule: str, path: str) -> None:
    report = validate(mutate(valid(), change))
    assert not report.valid
    assert (rule, path) in issues(report.errors), report.to_dict()


def test_shape_messages_are_sentences_naming_the_place() -> None:
    doc = mutate(valid(), lambda d: d["dbSchema"][0]["tables"][1]["fields"][1].update(type="String", extra=1))
    by_rule = {e.rule: e.message for e in check_shape(doc)}
    assert by_rule["unknown-field-type"] == (
        "'type' of field 'AGE' in table 'EMPLOYEE2' is 'String', which is not one of "
        "Text, Integer, Long, Float, Double, Blob."
    )
    assert "Unknown key 'extra' in field 'AGE' in table 'EMPLOYEE2'" in by_rule["unknown-key"]
    missing = check_shape(mutate(valid(), lambda d: d["dbSchema"][0].pop("tables")))
    assert [m.message for m in missing] == ["Database 'RdbTest' lacks the required key 'tables'."]


def test_db_name_message_suggests_the_name_without_extension() -> None:
    [issue] = check_shape(mutate(valid(), lambda d: d["dbSchema"][0].update(dbName="RdbTest.db")))
    assert "'RdbTest'" in issue.message


def test_device_sync_fields_may_be_absent_in_the_shape_layer() -> None:
    doc = mutate(valid(), lambda d: d["dbSchema"][0]["tables"][0].pop("deviceSyncFields"))
    assert check_shape(doc) == []


def test_duplicate_table_name() -> None:
    doc = mutate(valid(), lambda d: d["dbSchema"][0]["tables"][1].update(tableName="EMPLOYEE"))
    assert issues(check_shape(doc)) == {("duplicate-table", "/dbSchema/0/tables/1/tableName")}


def test_duplicate_column_name() -> None:
    doc = mutate(valid(), lambda d: d["dbSchema"][0]["tables"][0]["fields"][3].update(columnName="AGE"))
    assert issues(check_shape(doc)) == {("duplicate-column", f"{T0}/fields/3/columnName")}


def test_duplicate_sync_column() -> None:
    doc = mutate(valid(), lambda d: d["dbSchema"][0]["tables"][0]["deviceSyncFields"].append("NAME"))
    assert issues(check_shape(doc)) == {("duplicate-sync-column", f"{T0}/deviceSyncFields/4")}


def test_duplicate_db_entry() -> None:
    doc = valid()
    doc["dbSchema"].append(json.loads(json.dumps(doc["dbSchema"][0])))
    assert issues(check_shape(doc)) == {("duplicate-db", "/dbSchema/1")}


def test_same_table_name_in_two_databases_is_fine() -> None:
    doc = valid()
    doc["dbSchema"].append(mutate(doc["dbSchema"][0], lambda e: e.update(dbName="Other")))
    assert check_shape(doc) == []


def test_duplicates_are_found_alongside_schema_errors() -> None:
    doc = mutate(
        valid(),
        lambda d: (d["dbSchema"][0].update(version="x"), d["dbSchema"][0]["tables"][1].update(tableName="EMPLOYEE")),
    )
    assert {i.rule for i in check_shape(doc)} == {"wrong-type", "duplicate-table"}


def test_json_pointer_escapes_keys() -> None:
    doc = mutate(valid(), lambda d: d.update({"a/b~c": 1}))
    assert issues(check_shape(doc)) == {("unknown-key", "/a~1b~0c")}


@pytest.mark.parametrize("doc", [None, 0, "x", [], [valid()], {"dbSchema": None}, {"dbSchema": [None]}, {}])
def test_non_documents_are_reported_not_raised(doc: Any) -> None:
    report = validate(doc, shapes={}, previous={"version": 0}, bundle="b", db_name="d", tables=["T"])
    assert not report.valid


# -- parse_document ----------------------------------------------------------


def test_parse_document_accepts_text_bytes_and_a_bom() -> None:
    text = json.dumps(valid())
    assert parse_document(text) == valid()
    assert parse_document(text.encode()) == valid()
    assert parse_document(b"\xef\xbb\xbf" + text.encode()) == valid()


def test_bad_json_names_line_and_column() -> None:
    text = '{\n  "dbSchema": [\n    {"version": 0,, }\n  ]\n}'
    with pytest.raises(SchemaInvalid) as info:
        parse_document(text)
    assert "line 3, column 19" in info.value.message
    assert info.value.data == {"rule": "invalid-json", "line": 3, "column": 19}


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"\xff\xfe{}", "not UTF-8"),
        ('{"version": NaN}', "NaN"),
        ('{"a": 1, "a": 2}', "appears twice"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        (" " * (MAX_DOCUMENT_BYTES + 1), "larger than"),
        ("", "line 1, column 1"),
    ],
)
def test_parse_document_refusals(raw: str | bytes, words: str) -> None:
    with pytest.raises(SchemaInvalid) as info:
        parse_document(raw)
    assert words in info.value.message
    assert info.value.data["rule"] == "invalid-json"


def test_parse_document_rejects_non_text() -> None:
    with pytest.raises(SchemaInvalid):
        parse_document(12)  # type: ignore[arg-type]


def test_find_db_entry() -> None:
    doc = valid()
    assert find_db_entry(doc, "com.example.rdbDataSync", "RdbTest") == (0, doc["dbSchema"][0])
    assert find_db_entry(doc, "com.example.rdbDataSync", "RdbTest.db") is None
    assert find_db_entry({}, "a", "b") is None


@pytest.mark.parametrize("number", ["9" * 5000, str(2**63), str(-(2**63) - 1), "1" + "0" * 25])
def test_an_integer_outside_64_bits_is_invalid_json_with_its_path(number: str) -> None:
    """Issue 10 item 3: a 5000-digit version gave INTERNAL_ERROR (int() refuses over 4300 digits)."""
    doc = valid()
    text = json.dumps(doc).replace('"version": 0', '"version": ' + number, 1)
    assert number in text
    with pytest.raises(SchemaInvalid) as info:
        parse_document(text)
    assert info.value.data == {"rule": "invalid-json", "path": "/dbSchema/0/version"}
    assert "/dbSchema/0/version" in info.value.message and "64-bit" in info.value.message
    report = validate_document(text)
    assert not report.valid and report.errors[0].path == "/dbSchema/0/version"


def test_the_edges_of_the_64_bit_range_parse() -> None:
    assert parse_document(f"[{2**63 - 1}, {-(2**63)}, -0, 0]") == [2**63 - 1, -(2**63), 0, 0]
