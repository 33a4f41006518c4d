"""The cloud store on real engines: every test that takes ``any_store`` runs on SQLite and on a
throwaway PostgreSQL (skipped where PostgreSQL is not installed)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from cloud_sync import store as st
from cloud_sync.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Migration,
    SchemaVersionError,
    StateError,
    Store,
    StoreError,
    open_store,
)
from edge_runtime.core.protocol import Record

pytestmark = pytest.mark.integration


def pred(seq: int, t: int, y: int = 1) -> Record:
    return Record(seq, "p", t, {"m": "digits_mlp", "y": y, "p": 0.9})


def metric(seq: int, t: int, pipeline: str = "digits", lat: float = 1.5) -> Record:
    return Record(seq, "m", t, {"pipeline": pipeline, "latency_ms": lat})


def drift(seq: int, end: int, model: str = "digits_mlp", psi: float = 0.1) -> Record:
    return Record(seq, "d", end, {"model": model, "model_version": "3", "start_ms": end - 60_000, "end_ms": end,
                                  "summary": {"psi": psi}})


def event(seq: int, t: int, name: str = "model_swapped", severity: str = "info", ref: str = "") -> Record:
    payload = {"name": name, "severity": severity}
    if ref:
        payload["ref"] = ref
    return Record(seq, "e", t, payload)


def mixed(first: int = 0, t0: int = 1_000_000) -> list[Record]:
    """Ten records of every kind: seqs first..first+9."""
    return [pred(first, t0), pred(first + 1, t0 + 1), metric(first + 2, t0 + 2), drift(first + 3, t0 + 3),
            event(first + 4, t0 + 4), pred(first + 5, t0 + 5), metric(first + 6, t0 + 6),
            Record(first + 7, "d", t0 + 7, {"not": "a drift summary"}), event(first + 8, t0 + 8, "cmd_applied",
                                                                                ref="ro-12"),
            Record(first + 9, "x", t0 + 9, {"future": True})]


def table_sizes(store: st.BaseStore) -> tuple[int, int, int, int]:
    return (store.count(), len(store.metric_series("dev-1", limit=10_000)),
            len(store.drift_summaries(limit=10_000)), len(store.events(limit=10_000)))


# -- ingest ---------------------------------------------------------------------------------------------

def test_a_batch_is_stored_once_and_resending_it_changes_nothing(any_store: st.BaseStore) -> None:
    recs = mixed()
    assert any_store.insert_records("dev-1", "boot-a", recs, 5) == (10, 0)
    assert any_store.insert_records("dev-1", "boot-a", recs, 6) == (0, 10)
    # Repacked after a restart: half old, half new.
    assert any_store.insert_records("dev-1", "boot-a", [*recs[5:], *mixed(10, 2_000_000)[:5]], 7) == (5, 5)
    # The same seqs under another boot or device are other records.
    assert any_store.insert_batch("dev-1", "boot-b", recs[:3], 8) == (3, 0)
    assert any_store.insert_batch("dev-2", "boot-a", recs[:3], 8) == (3, 0)
    assert any_store.count() == 21
    rows = any_store.records("dev-1")
    assert [(b, s) for _d, b, s, _k, _c, _p in rows][:3] == [("boot-a", 0), ("boot-b", 0), ("boot-a", 1)]
    assert rows[0] == ("dev-1", "boot-a", 0, "p", 1_000_000, {"m": "digits_mlp", "y": 1, "p": 0.9})
    assert len(any_store.records()) == 21
    assert any_store.insert_batch("dev-1", "boot-a", [], 9) == (0, 0)


def test_big_batches_are_inserted_in_chunks(any_store: st.BaseStore) -> None:
    recs = [pred(i, 1000 + i) for i in range(1000)]
    assert any_store.insert_records("dev-1", "b", recs, 5) == (1000, 0)
    assert any_store.insert_records("dev-1", "b", [pred(i, 1000 + i) for i in range(990, 1010)], 5) == (10, 10)


def test_metric_drift_and_event_records_fan_out_once(any_store: st.BaseStore) -> None:
    recs = mixed()
    any_store.insert_records("dev-1", "b", recs, 5)
    # 2 metrics, 1 valid drift summary (the other stays a record only), 2 events.
    assert table_sizes(any_store) == (10, 2, 1, 2)
    any_store.insert_records("dev-1", "b", recs, 6)
    any_store.insert_batch("dev-1", "b", recs[::-1], 7)
    assert table_sizes(any_store) == (10, 2, 1, 2)
    any_store.insert_batch("dev-1", "b", [*recs[6:], *mixed(10)], 8)
    assert table_sizes(any_store) == (20, 4, 2, 4)
    # fan_out=False stores records only; insert_metrics/... fill in later, keyed like their records.
    later = mixed(20)
    any_store.insert_batch("dev-1", "b", later, 9, fan_out=False)
    assert table_sizes(any_store) == (30, 4, 2, 4)
    assert any_store.insert_metrics("dev-1", "b", later) == 2
    assert any_store.insert_drift("dev-1", "b", later) == 1
    assert any_store.insert_events("dev-1", "b", later) == 2
    assert any_store.insert_metrics("dev-1", "b", later) == 0
    assert table_sizes(any_store) == (30, 6, 3, 6)


def test_a_batch_and_its_fan_out_commit_or_fail_together(any_store: st.BaseStore,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_a: object) -> tuple[object, ...]:
        raise RuntimeError("fan-out failed")

    monkeypatch.setitem(st._FAN_OUT, "e", (broken, st._FAN_OUT["e"][1]))
    with pytest.raises(RuntimeError, match="fan-out failed"):
        any_store.insert_records("dev-1", "b", mixed(), 5)
    assert table_sizes(any_store) == (0, 0, 0, 0)
    monkeypatch.undo()
    assert any_store.insert_records("dev-1", "b", mixed(), 5) == (10, 0)  # the resend then goes in whole
    assert table_sizes(any_store) == (10, 2, 1, 2)


def test_status_and_counters(any_store: st.BaseStore) -> None:
    any_store.upsert_status("dev-1", True, "b1", 100, {"agent_version": "0.1.0"})
    any_store.upsert_status("dev-1", False, None, 200, {"agent_version": "0.1.1"})
    any_store.upsert_status("dev-2", True, "b9", 150, {})
    assert any_store.devices() == {
        "dev-1": {"online": False, "boot_id": None, "last_seen_ms": 200, "status": {"agent_version": "0.1.1"}},
        "dev-2": {"online": True, "boot_id": "b9", "last_seen_ms": 150, "status": {}}}
    any_store.bump({"batches": 1, "rejected.bad_json": 2})
    any_store.bump({"batches": 2})
    any_store.bump({})
    assert any_store.counters() == {"batches": 3, "rejected.bad_json": 2}


# -- dashboard queries ------------------------------------------------------------------------------

def test_metric_series_is_oldest_first_and_keeps_the_latest(any_store: st.BaseStore) -> None:
    any_store.insert_records("dev-1", "b", [metric(i, 1000 * i, lat=float(i)) for i in range(10)], 5)
    any_store.insert_records("dev-1", "b", [metric(10, 500, pipeline="other")], 5)
    any_store.insert_records("dev-2", "b", [metric(0, 1000)], 5)
    series = any_store.metric_series("dev-1", pipeline="digits")
    assert [m["time_ms"] for m in series] == [1000 * i for i in range(10)]
    assert series[3] == {"time_ms": 3000, "pipeline": "digits", "boot_id": "b", "seq": 3,
                         "payload": {"pipeline": "digits", "latency_ms": 3.0}}
    assert [m["seq"] for m in any_store.metric_series("dev-1", since_ms=7000)] == [7, 8, 9]
    assert [m["seq"] for m in any_store.metric_series("dev-1", limit=2)] == [8, 9]
    assert len(any_store.metric_series("dev-1")) == 11
    assert any_store.metric_series("nobody") == []


def test_drift_summaries_and_events(any_store: st.BaseStore) -> None:
    any_store.insert_records("dev-1", "b", [drift(0, 60_000), drift(1, 120_000, psi=0.3),
                                            drift(2, 90_000, model="other"), event(3, 10), event(4, 20, "source_failed",
                                                                                                "error")], 5)
    any_store.insert_records("dev-2", "b", [drift(0, 180_000), event(1, 30, ref="fb-88")], 5)
    all_d = any_store.drift_summaries()
    assert [(d["device_id"], d["end_ms"]) for d in all_d] == [("dev-1", 60_000), ("dev-1", 90_000),
                                                             ("dev-1", 120_000), ("dev-2", 180_000)]
    assert all_d[2] == {"device_id": "dev-1", "boot_id": "b", "seq": 1, "model": "digits_mlp", "model_version": "3",
                        "start_ms": 60_000, "end_ms": 120_000, "summary": {"psi": 0.3}}
    assert [d["end_ms"] for d in any_store.drift_summaries("digits_mlp", since_ms=100_000)] == [120_000, 180_000]
    assert [d["end_ms"] for d in any_store.drift_summaries(device_id="dev-2")] == [180_000]
    assert [d["end_ms"] for d in any_store.drift_summaries(limit=1)] == [180_000]
    evs = any_store.events()
    assert [(e["device_id"], e["time_ms"]) for e in evs] == [("dev-2", 30), ("dev-1", 20), ("dev-1", 10)]
    assert evs[0]["ref"] == "fb-88" and evs[0]["payload"] == {"name": "model_swapped", "severity": "info",
                                                              "ref": "fb-88"}
    assert [e["name"] for e in any_store.events("dev-1", since_ms=15)] == ["source_failed"]
    assert [e["time_ms"] for e in any_store.events(severity="info", limit=1)] == [30]


# -- export -------------------------------------------------------------------------------------------------

def test_export_streams_in_key_order_by_page(any_store: st.BaseStore) -> None:
    # Many records share one created_ms: pages must split ties by the key without losing any.
    for dev in ("dev-2", "dev-1"):
        any_store.insert_records(dev, "b", [*mixed(0, 1000), *(pred(100 + i, 1000) for i in range(20))], 5)
    everything = list(any_store.export(0))
    assert len(everything) == 60
    keys = [(r["created_ms"], r["device_id"], r["boot_id"], r["seq"]) for r in everything]
    assert keys == sorted(keys)
    assert everything[0] == {"device_id": "dev-1", "boot_id": "b", "seq": 0, "kind": "p", "created_ms": 1000,
                             "received_ms": 5, "payload": {"m": "digits_mlp", "y": 1, "p": 0.9}}
    assert list(any_store.export(0, page_rows=3)) == everything
    assert list(any_store.export(0, page_rows=1)) == everything
    assert [r["seq"] for r in any_store.export(1005)] == [5, 5, 6, 6, 7, 7, 8, 8, 9, 9]
    assert [r["seq"] for r in any_store.export(1002, until_ms=1004)] == [2, 2, 3, 3]
    by_kind = list(any_store.export(0, ["m", "d", "e"], page_rows=2))
    assert [(r["kind"], r["seq"]) for r in by_kind] == [(k, s) for k, s in
                                                        [("m", 2), ("m", 2), ("d", 3), ("d", 3), ("e", 4), ("e", 4),
                                                         ("m", 6), ("m", 6), ("d", 7), ("d", 7), ("e", 8), ("e", 8)]]
    assert [r["kind"] for r in any_store.export(0, ["x"])] == ["x", "x"]
    assert list(any_store.export(0, [])) == []
    raw = next(any_store.export(0, ["m"], decode=False))
    assert json.loads(raw["payload"]) == {"pipeline": "digits", "latency_ms": 1.5}


def test_export_holds_no_lock_between_pages(any_store: st.BaseStore) -> None:
    any_store.insert_records("dev-1", "b", [pred(i, 1000 + i) for i in range(10)], 5)
    seen = 0
    for r in any_store.export(0, page_rows=3):
        # The ingest goes on while an export is read (a held lock would deadlock here).
        any_store.insert_records("dev-9", "b", [pred(r["seq"], 5000 + r["seq"])], 6)
        seen += 1
    assert seen == 20  # the export also reached what was added behind it
    assert any_store.count() == 20


# -- retention ---------------------------------------------------------------------------------------------

def test_prune_deletes_old_predictions_in_chunks(any_store: st.BaseStore) -> None:
    day = 86_400_000
    now = 100 * day
    old = [pred(i, now - 10 * day + i) for i in range(23)]
    new = [pred(100 + i, now - day + i) for i in range(5)]
    history = [metric(200, now - 10 * day), drift(201, now - 10 * day), event(202, now - 10 * day),
               metric(203, now - 40 * day), drift(204, now - 40 * day), event(205, now - 40 * day)]
    any_store.insert_records("dev-1", "b", [*old, *new, *history], 5)
    assert any_store.prune(now, 7 * 86_400, chunk_rows=5) == 23
    assert any_store.count() == 5 + 6
    assert table_sizes(any_store)[1:] == (2, 2, 2)
    assert any_store.prune(now, 7 * 86_400) == 0
    # Keep at most 2 predictions: the oldest go.
    assert any_store.prune(now, None, keep_max_rows=2, chunk_rows=2) == 3
    assert [r["seq"] for r in any_store.export(0, ["p"])] == [103, 104]
    # The history has its own, longer limit: records of other kinds and their table rows.
    assert any_store.prune(now, 7 * 86_400, history_max_age_s=30 * 86_400) == 6
    assert table_sizes(any_store) == (2 + 3, 1, 1, 1)
    assert {r["kind"] for r in any_store.export(0)} == {"p", "m", "d", "e"}
    assert any_store.prune(now, 0, history_max_age_s=0) == 2 + 3 + 3  # records and table rows
    assert table_sizes(any_store) == (0, 0, 0, 0)


def test_prune_checks_its_arguments(any_store: st.BaseStore) -> None:
    with pytest.raises(ValueError, match="predictions_max_age_s is -1"):
        any_store.prune(0, -1)
    with pytest.raises(ValueError, match="chunk_rows"):
        any_store.prune(0, 1, chunk_rows=0)


# -- workflow tables ---------------------------------------------------------------------------------

def test_alerts_upsert_and_list_by_state(any_store: st.BaseStore) -> None:
    any_store.upsert_alert("drift:dev-1:digits", rule="drift", subject="dev-1", state="firing", severity="warning",
                           payload={"psi": 0.3}, updated_ms=100)
    any_store.upsert_alert("offline:dev-2", rule="offline", subject="dev-2", state="firing", severity="error",
                           payload={}, updated_ms=200)
    any_store.upsert_alert("drift:dev-1:digits", rule="drift", subject="dev-1", state="resolved", severity="info",
                           payload={"psi": 0.05}, updated_ms=300)
    assert [a["id"] for a in any_store.alerts()] == ["drift:dev-1:digits", "offline:dev-2"]
    assert any_store.alerts("firing") == [{"id": "offline:dev-2", "rule": "offline", "subject": "dev-2",
                                           "state": "firing", "severity": "error", "payload": {},
                                           "updated_ms": 200}]
    assert [a["payload"] for a in any_store.alerts("resolved")] == [{"psi": 0.05}]
    assert len(any_store.alerts(["firing", "resolved"])) == 2
    assert any_store.alerts("acknowledged") == []


def test_retrain_requests(any_store: st.BaseStore) -> None:
    assert any_store.add_retrain_request("rt-1", model="digits_mlp", reason="drift", payload={"psi": 0.4},
                                         created_ms=100)
    assert not any_store.add_retrain_request("rt-1", model="other", reason="x", payload={}, created_ms=999)
    assert any_store.add_retrain_request("rt-2", model="other", reason="accuracy", payload={}, created_ms=200)
    any_store.update_retrain_request("rt-1", state="done", updated_ms=300, outcome={"bundle": "digits_mlp-4"})
    assert any_store.retrain_requests() == [
        {"id": "rt-2", "created_ms": 200, "model": "other", "reason": "accuracy", "payload": {},
         "state": "requested", "outcome": None, "updated_ms": 200},
        {"id": "rt-1", "created_ms": 100, "model": "digits_mlp", "reason": "drift", "payload": {"psi": 0.4},
         "state": "done", "outcome": {"bundle": "digits_mlp-4"}, "updated_ms": 300}]
    assert [r["id"] for r in any_store.retrain_requests("requested")] == ["rt-2"]
    assert [r["id"] for r in any_store.retrain_requests(model="digits_mlp")] == ["rt-1"]
    with pytest.raises(StateError, match="no retrain request 'rt-9'"):
        any_store.update_retrain_request("rt-9", state="done", updated_ms=1)


def test_review_queue(any_store: st.BaseStore) -> None:
    assert any_store.add_review("rv-1", device_id="dev-1", model="digits_mlp", payload={"y": 7, "p": 0.51},
                                created_ms=100)
    assert any_store.add_review("rv-2", device_id="dev-2", model="digits_mlp", payload={"y": 1}, created_ms=50)
    assert not any_store.add_review("rv-1", device_id="dev-9", model="x", payload={}, created_ms=1)
    assert [r["id"] for r in any_store.reviews()] == ["rv-2", "rv-1"]
    assert [r["id"] for r in any_store.reviews(device_id="dev-1")] == ["rv-1"]
    any_store.resolve_review("rv-1", state="corrected", label=9, reviewed_by="ana", reviewed_ms=200)
    any_store.resolve_review("rv-2", state="confirmed", label=1, reviewed_by="bo", reviewed_ms=210)
    assert any_store.reviews() == []
    assert any_store.reviews("corrected") == [
        {"id": "rv-1", "device_id": "dev-1", "model": "digits_mlp", "created_ms": 100, "payload": {"y": 7, "p": 0.51},
         "state": "corrected", "label": 9, "reviewed_by": "ana", "reviewed_ms": 200}]
    assert len(any_store.reviews(None)) == 2
    with pytest.raises(StateError, match="review 'rv-1' is already corrected \\(by ana\\), expected pending"):
        any_store.resolve_review("rv-1", state="confirmed", label=7, reviewed_by="bo", reviewed_ms=300)
    with pytest.raises(StateError, match="no review 'rv-9'"):
        any_store.resolve_review("rv-9", state="confirmed", label=7, reviewed_by="bo", reviewed_ms=300)
    with pytest.raises(StateError, match="cannot resolve to 'pending'"):
        any_store.resolve_review("rv-2", state="pending", label=None, reviewed_by="bo", reviewed_ms=300)
    with pytest.raises(ValueError, match="review state"):
        any_store.reviews("done")


def test_rollouts_upsert_and_list_by_state(any_store: st.BaseStore) -> None:
    any_store.upsert_rollout("digits-v4-r1", state="running", payload={"stage": "shadow"}, updated_ms=100)
    any_store.upsert_rollout("digits-v5-r1", state="done", payload={"stage": "done"}, updated_ms=200)
    any_store.upsert_rollout("digits-v4-r1", state="rolled_back", payload={"stage": "step-0", "n": [1, 2]},
                             updated_ms=300)
    assert [r["id"] for r in any_store.rollouts()] == ["digits-v5-r1", "digits-v4-r1"]
    assert any_store.rollout("digits-v4-r1") == {"id": "digits-v4-r1", "state": "rolled_back",
                                                 "payload": {"stage": "step-0", "n": [1, 2]}, "updated_ms": 300}
    assert any_store.rollouts("running") == []
    assert [r["id"] for r in any_store.rollouts(["done", "rolled_back"])] == ["digits-v5-r1", "digits-v4-r1"]
    assert any_store.rollout("nope") is None


# -- schema migrations -------------------------------------------------------------------------------------

def test_a_new_store_is_at_the_latest_version(any_store: st.BaseStore) -> None:
    assert any_store.schema_version == SCHEMA_VERSION == MIGRATIONS[-1].version
    assert [m.version for m in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))


def test_upgrading_from_version_1_keeps_rows_and_fills_the_new_tables(any_store_url: str) -> None:
    with open_store(any_store_url, MIGRATIONS[:1]) as v1:
        assert v1.schema_version == 1
        v1.insert_batch("dev-1", "b", mixed(), 5, fan_out=False)
        v1.upsert_status("dev-1", True, "b", 5, {"agent_version": "0.1.0"})
        v1.bump({"batches": 1})
    with open_store(any_store_url) as store:
        assert store.schema_version == SCHEMA_VERSION
        assert store.count() == 10
        assert store.devices()["dev-1"]["online"] is True
        assert store.counters() == {"batches": 1}
        assert table_sizes(store) == (10, 2, 1, 2)  # the v2 backfill
        assert store.insert_records("dev-1", "b", mixed(), 6) == (0, 10)
        assert table_sizes(store) == (10, 2, 1, 2)
    with open_store(any_store_url) as again:  # opening an up-to-date store changes nothing
        assert again.schema_version == SCHEMA_VERSION and table_sizes(again) == (10, 2, 1, 2)


def test_upgrading_from_version_3_adds_the_rollouts_table(any_store_url: str) -> None:
    with open_store(any_store_url, MIGRATIONS[:3]) as v3:
        assert v3.schema_version == 3
        v3.insert_batch("dev-1", "b", mixed(), 5)
        v3.upsert_alert("slow:dev-1", rule="slow", subject="dev-1", state="firing", severity="warning",
                        payload={}, updated_ms=7)
    with open_store(any_store_url) as store:
        assert store.schema_version == SCHEMA_VERSION == 4
        assert table_sizes(store) == (10, 2, 1, 2)
        assert [a["id"] for a in store.alerts()] == ["slow:dev-1"]
        assert store.rollouts() == []
        store.upsert_rollout("r1", state="running", payload={"x": 1}, updated_ms=9)
    with open_store(any_store_url) as again:
        assert again.rollout("r1") == {"id": "r1", "state": "running", "payload": {"x": 1}, "updated_ms": 9}


# cloud-sync 0.1's _SCHEMA, verbatim: the SQLite files in the field are version 1 of this.
_V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    device_id TEXT NOT NULL, boot_id TEXT NOT NULL, seq INTEGER NOT NULL,
    kind TEXT NOT NULL, created_ms INTEGER NOT NULL, received_ms INTEGER NOT NULL, payload TEXT NOT NULL,
    PRIMARY KEY (device_id, boot_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_by_time ON records (created_ms);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, online INTEGER NOT NULL, boot_id TEXT, last_seen_ms INTEGER NOT NULL,
    status TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def test_a_version_1_sqlite_file_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "cloud-sync.db"
    with sqlite3.connect(path) as db:
        db.executescript(_V1_SCHEMA)
        db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        db.executemany("INSERT INTO records VALUES (?,?,?,?,?,?,?)",
                       [("dev-1", "b", r.seq, r.kind, r.created_ms, 5, json.dumps(r.payload)) for r in mixed()])
        db.execute("INSERT INTO devices VALUES ('dev-1', 0, 'b', 7, '{\"agent_version\":\"0.1.0\"}')")
        db.execute("INSERT INTO counters VALUES ('batches', 4)")
    db.close()
    store = Store(path)
    try:
        assert store.schema_version == SCHEMA_VERSION
        assert len(store.records("dev-1")) == 10
        assert store.records("dev-1")[0] == ("dev-1", "b", 0, "p", 1_000_000, {"m": "digits_mlp", "y": 1, "p": 0.9})
        assert store.devices() == {"dev-1": {"online": False, "boot_id": "b", "last_seen_ms": 7,
                                             "status": {"agent_version": "0.1.0"}}}
        assert store.counters() == {"batches": 4}
        assert table_sizes(store) == (10, 2, 1, 2)
    finally:
        store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (str(SCHEMA_VERSION),)
    db.close()


def test_a_store_newer_than_the_code_is_refused(any_store_url: str) -> None:
    future = (*MIGRATIONS, Migration(SCHEMA_VERSION + 1, "from the future", sql=("CREATE TABLE future (x BIGINT)",)))
    with open_store(any_store_url, future) as s:
        assert s.schema_version == SCHEMA_VERSION + 1
    with pytest.raises(SchemaVersionError) as e:
        open_store(any_store_url)
    assert e.value.found == SCHEMA_VERSION + 1 and e.value.supported == SCHEMA_VERSION
    assert f"store schema version {SCHEMA_VERSION + 1} is newer than this cloud-sync supports " \
           f"({SCHEMA_VERSION}); upgrade cloud-sync" in str(e.value)


def test_a_failed_migration_leaves_the_store_as_it_was(any_store_url: str) -> None:
    with open_store(any_store_url) as s:
        s.insert_records("dev-1", "b", mixed(), 5)
    bad = (*MIGRATIONS, Migration(SCHEMA_VERSION + 1, "half-broken",
                                  sql=("CREATE TABLE extra (x BIGINT)", "CREATE TABLE broken (x NOSUCHTYPE(")))
    with pytest.raises(StoreError, match=f"migration {SCHEMA_VERSION + 1} \\(half-broken\\) failed, schema stays "
                                         f"at version {SCHEMA_VERSION}"):
        open_store(any_store_url, bad)
    # The step's first statement was rolled back with it: creating that table again works.
    fixed = (*MIGRATIONS, Migration(SCHEMA_VERSION + 1, "fixed", sql=("CREATE TABLE extra (x BIGINT)",)))
    with open_store(any_store_url, fixed) as s:
        assert s.schema_version == SCHEMA_VERSION + 1
        assert s.count() == 10


def test_migration_lists_are_checked() -> None:
    with pytest.raises(ValueError, match=r"1, 2, 3, \.\.\. in order; got \[1, 3\]"):
        st._check_migrations([MIGRATIONS[0], MIGRATIONS[2]])
    with pytest.raises(ValueError, match="got \\[\\]"):
        st._check_migrations([])


# -- opening and closing ---------------------------------------------------------------------------

def test_open_store_understands_paths_and_urls(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    with open_store(f"sqlite:///{path}") as s:
        assert isinstance(s, Store) and s.path == str(path)
        s.insert_records("dev-1", "b", mixed(), 5)
    with open_store(path, create=False) as s:
        assert s.count() == 10
    with pytest.raises(StoreError, match="no SQLite store here"):
        open_store(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()
    with pytest.raises(StoreError, match="unknown store URL scheme 'mysql'"):
        open_store("mysql://u:secret@h/db")
    with pytest.raises(StoreError, match="sqlite:///PATH"):
        open_store("sqlite://relative.db")


def test_a_closed_store_says_so(any_store: st.BaseStore) -> None:
    any_store.close()
    any_store.close()
    with pytest.raises(StoreError, match="the store is closed"):
        any_store.count()


def test_a_file_that_is_not_a_database_is_reported_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"junk\.db: not a usable SQLite database"):
        Store(path)
    assert path.read_bytes() == b"this is not a database" * 100


def test_postgres_store_reconnects_after_losing_its_connection(postgres_url: str, postgres_server) -> None:
    with open_store(postgres_url) as s:
        s.insert_records("dev-1", "b", mixed(), 5)
        dbname = postgres_url.rsplit("/", 1)[1]
        postgres_server.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{dbname}'")
        with pytest.raises(StoreError):  # the statement in flight when the server went away fails ...
            s.count()
        assert s.count() == 10  # ... and the next one reconnects


def test_postgres_password_is_kept_out_of_messages() -> None:
    pytest.importorskip("psycopg", reason="psycopg not installed (pip install 'edge-runtime[postgres]')")
    from cloud_sync.store_postgres import redact

    assert redact("postgresql://ingest:s3cret@db.example:5432/fleet") == "postgresql://ingest:***@db.example:5432/fleet"
    assert redact("postgresql://ingest@db.example/fleet") == "postgresql://ingest@db.example/fleet"


def test_importing_the_store_does_not_load_psycopg() -> None:
    code = "import sys, cloud_sync.store, cloud_sync.cli; print('psycopg' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
