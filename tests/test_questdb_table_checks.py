"""The pure judgements behind QuestDB persistence health: the events table's shape
(``verify_questdb_table``) and the two ``events_store`` checks (``table_check``,
``persistence_check``). No server: rows as QuestDB's ``tables()`` / ``table_columns()`` return
them (checked against a real QuestDB 9.3 in tests/test_questdb_real.py)."""

from __future__ import annotations

from typing import Any

from actors.questdb.dialect import QUESTDB_COLUMN_TYPES, verify_questdb_table
from actors.questdb.persistence import persistence_check, table_check, table_lost

TABLE = "supervision_events"
GOOD_INFO = {"walEnabled": True, "dedup": True, "designatedTimestamp": "ts"}
DEDUP_ALTER = f"ALTER TABLE {TABLE} DEDUP ENABLE UPSERT KEYS(ts, seq)"


def columns(keys: tuple[str, ...] = ("ts", "seq"), **types: str) -> list[dict[str, Any]]:
    return [{"column": name, "type": types.get(name, wanted), "upsertKey": name in keys}
            for name, wanted in QUESTDB_COLUMN_TYPES.items()]


def test_the_table_the_runtime_creates_passes() -> None:
    verdict = verify_questdb_table(TABLE, GOOD_INFO, columns())
    assert verdict.problems == () and verdict.repairs == ()


def test_lost_or_wrong_dedup_is_repaired() -> None:
    no_dedup = verify_questdb_table(TABLE, {**GOOD_INFO, "dedup": False}, columns(keys=()))
    assert no_dedup.problems == () and no_dedup.repairs == (DEDUP_ALTER,)
    # Deduplicating on ts alone would merge distinct events that share a timestamp.
    ts_only = verify_questdb_table(TABLE, GOOD_INFO, columns(keys=("ts",)))
    assert ts_only.repairs == (DEDUP_ALTER,)


def test_what_cannot_be_repaired_is_a_problem_naming_the_remedy() -> None:
    not_wal = verify_questdb_table(TABLE, {**GOOD_INFO, "walEnabled": False, "dedup": False},
                                   columns(keys=()))
    assert not_wal.repairs == ()
    assert any("SET TYPE WAL" in p for p in not_wal.problems)
    other_ts = verify_questdb_table(TABLE, {**GOOD_INFO, "designatedTimestamp": "at"},
                                    columns())
    assert any("designated timestamp 'at'" in p for p in other_ts.problems)
    missing = verify_questdb_table(TABLE, GOOD_INFO,
                                   [c for c in columns() if c["column"] != "payload"])
    assert missing.problems == (
        f"table {TABLE} has no column payload (VARCHAR): add it with "
        f"ALTER TABLE {TABLE} ADD COLUMN payload VARCHAR",)
    mistyped = verify_questdb_table(TABLE, GOOD_INFO, columns(seq="INT"))
    assert any("column seq is INT, not LONG" in p for p in mistyped.problems)
    assert verify_questdb_table(TABLE, None, []).problems == (f"table {TABLE} does not exist",)


def test_table_check() -> None:
    assert table_check({"table": TABLE})[0] == "pass"
    status, output = table_check({"table": TABLE, "suspended": True,
                                  "wal_error": "Disk full"})
    assert status == "fail"
    assert "(Disk full)" in output and f"ALTER TABLE {TABLE} RESUME WAL" in output
    status, output = table_check({"table": TABLE, "problems": ["not a WAL table"]})
    assert status == "fail" and "nothing skipped" in output
    status, output = table_check({"table": TABLE, "repaired": [DEDUP_ALTER]})
    assert status == "warn" and DEDUP_ALTER in output


def test_persistence_check() -> None:
    def check(**kw: Any) -> tuple[str, str]:
        values: dict[str, Any] = {"failing": False, "last_error": None, "lag": 0,
                                  "stalled_checks": 0, "lag_warn_events": 1000,
                                  "stall_checks": 3}
        values.update(kw)
        return persistence_check(**values)

    assert check()[0] == "pass"
    assert check(lag=5, stalled_checks=2)[0] == "pass"  # behind for a moment: normal
    status, output = check(failing=True, lag=7, last_error={
        "code": "DB_UNAVAILABLE", "message": "persist_events 3..9 failed: refused"})
    assert status == "warn" and "DB_UNAVAILABLE" in output and "7 events" in output
    assert check(lag=1000)[0] == "warn"
    status, output = check(lag=3, stalled_checks=3)
    assert status == "warn" and "no progress" in output


def test_wal_lag_is_never_a_lost_table() -> None:
    assert table_lost({"max_seq": 5, "pending_txns": 0}, persisted_before=9)
    assert not table_lost({"max_seq": 9, "pending_txns": 0}, persisted_before=9)
    # Rows committed but not applied yet are invisible: not lost.
    assert not table_lost({"max_seq": 5, "pending_txns": 2}, persisted_before=9)
    assert not table_lost({"max_seq": 5, "suspended": True}, persisted_before=9)
    assert not table_lost({"max_seq": 0, "problems": ["not a WAL table"]}, persisted_before=9)
