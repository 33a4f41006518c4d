"""FleetState: the cloud's live view of a fleet, fed with real protocol messages (no broker, no clock).

Drift summaries come from real DriftMonitors over numpy data with a reference from build_reference; the
fleet's merge of per-device summaries must equal the summary of all devices' windows in one stream."""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_sync.fleet import SERIES, FleetState, Series
from edge_runtime.core import protocol as p
from edge_runtime.core.drift import CalibrationSettings, DriftMonitor, Reference, build_reference, load_reference

T0 = 1_764_167_513_000
MIN = 60_000


def status(dev: str = "dev-1", boot: str = "boot-a", t: int = T0, models: tuple[tuple[str, str, str], ...] = (
        ("digits", "3", "active"),), online: bool = True) -> p.Status:
    msg = p.Status(dev, online, boot, t, "0.1.0", tuple(p.ModelStatus(*m) for m in models))
    return p.decode(msg.topic, msg.to_wire())  # type: ignore[return-value]  # exactly what ingest sees


def pipe(inputs: int = 1000, predictions: int = 990, errors: int = 10, low: int = 40, *, version: str = "3",
         p50_us: float = 790.0, p99_us: float = 1500.0, throughput: float = 20.0, **extra: Any) -> dict[str, Any]:
    return {"model_version": version, "window_s": 60.0, "inputs": inputs, "predictions": predictions,
            "throughput_per_s": throughput, "latency_us": {"count": 1200, "mean": 812.0, "p50": p50_us, "p90": 900.0,
                                                           "p99": p99_us, "max": 2100.0},
            "errors": {"shape": errors}, "low_confidence": low, "null_outputs": 0, "labels": {"3": 120, "7": 99},
            "drift_alarm": False, "accuracy": 0.91, "labelled": 50, **extra}


def telemetry(t: int, pipes: dict[str, dict[str, Any]] | None = None, dev: str = "dev-1", boot: str = "boot-a",
              cpu: float = 41.5, rss: float = 82.2, temp: float | None = 51.0) -> p.Telemetry:
    msg = p.Telemetry(dev, boot, t, {"cpu_percent": cpu, "rss_mb": rss, "temperature_c": temp, "uptime_s": 120.0,
                                     "pending": 12, "pipelines": {"digits": pipe()} if pipes is None else pipes})
    return p.decode(msg.topic, msg.to_wire())  # type: ignore[return-value]


def batch(records: list[tuple[str, int, dict[str, Any]]], dev: str = "dev-1", boot: str = "boot-a",
          first_seq: int = 1) -> p.RecordBatch:
    recs = [p.Record(first_seq + i, kind, t, payload) for i, (kind, t, payload) in enumerate(records)]
    packed = p.pack_batches(recs, device_id=dev, boot_id=boot)
    assert len(packed) == 1
    return p.decode(packed[0].topic, packed[0].payload)  # type: ignore[return-value]


def metric(t: int, name: str = "digits", **kw: Any) -> tuple[str, int, dict[str, Any]]:
    return ("m", t, {"pipeline": name, **pipe(**kw), "cpu_percent": 30.0, "rss_mb": 90.0, "temperature_c": 50.0})


def pred(model: str = "digits", score: float | None = 0.9, **extra: Any) -> tuple[str, int, dict[str, Any]]:
    payload: dict[str, Any] = {"i": "x-1", "m": model, "y": 3, **extra}
    if score is not None:
        payload["p"] = score
    return ("p", T0, payload)


def event(name: str, t: int = T0, **kw: Any) -> tuple[str, int, dict[str, Any]]:
    return ("e", t, p.Event(name, **kw).to_payload())


# -- presence --------------------------------------------------------------------------------------

def test_status_then_last_will_marks_the_device_offline() -> None:
    fleet = FleetState()
    fleet.observe_status(status(), T0)
    assert fleet.snapshot(T0)["devices"] == {"online": 1, "offline": 0, "stale": 0, "total": 1}
    will = p.last_will("dev-1", "boot-a", time_ms=T0, agent_version="0.1.0")
    fleet.observe_status(p.decode(will.topic, will.to_wire()), T0 + MIN)  # type: ignore[arg-type]
    snap = fleet.snapshot(T0 + 11 * MIN)
    assert snap["devices"] == {"online": 0, "offline": 1, "stale": 0, "total": 1}
    row = fleet.devices(T0 + 11 * MIN)[0]
    assert row["state"] == "offline" and row["online"] is False
    assert row["last_seen_ms"] == T0 and row["offline_minutes"] == pytest.approx(11.0)
    assert fleet.device("dev-1", T0)["offline_since_ms"] == T0 + MIN  # type: ignore[index]
    fleet.observe_status(status(boot="boot-b", t=T0 + 12 * MIN), T0 + 12 * MIN)       # back, new boot
    assert fleet.state("dev-1", T0 + 12 * MIN) == "online"
    assert fleet.devices(T0 + 12 * MIN)[0]["offline_minutes"] == 0.0


def test_a_late_last_will_of_an_earlier_boot_is_ignored() -> None:
    fleet = FleetState()
    fleet.observe_status(status(boot="boot-a", t=T0), T0)
    fleet.observe_status(status(boot="boot-b", t=T0 + 5_000), T0 + 5_000)   # restarted and reconnected
    fleet.observe_status(p.last_will("dev-1", "boot-a", time_ms=T0), T0 + 6_000)
    assert fleet.state("dev-1", T0 + 6_000) == "online"
    assert fleet.counters()["status_ignored"] == 1
    fleet.observe_status(p.last_will("dev-1", "boot-b", time_ms=T0 + 5_000), T0 + 7_000)
    assert fleet.state("dev-1", T0 + 7_000) == "offline"


def test_a_silent_device_becomes_stale() -> None:
    fleet = FleetState()
    fleet.observe_status(status(), T0)
    fleet.observe_telemetry(telemetry(T0 + 1_000), T0 + 1_000)
    assert fleet.state("dev-1", T0 + 1_000 + 3 * MIN) == "online"          # exactly stale_after_ms: not yet
    assert fleet.state("dev-1", T0 + 1_001 + 3 * MIN) == "stale"
    snap = fleet.snapshot(T0 + 10 * MIN)
    assert snap["devices"] == {"online": 0, "offline": 0, "stale": 1, "total": 1}
    assert fleet.devices(T0 + 10 * MIN)[0]["offline_minutes"] == pytest.approx((10 * MIN - 1_000) / MIN, abs=1e-3)
    quick = FleetState(stale_after_ms=10_000)
    quick.observe_status(status(), T0)
    assert quick.state("dev-1", T0 + 10_001) == "stale"
    assert quick.state("nobody", T0) is None


# -- metrics ---------------------------------------------------------------------------------------

def test_telemetry_gives_latest_metrics_and_series() -> None:
    fleet = FleetState()
    fleet.observe_status(status(), T0)
    fleet.observe_telemetry(telemetry(T0 + MIN, temp=None), T0 + MIN)
    fleet.observe_telemetry(telemetry(T0 + 2 * MIN, {"digits": pipe(2000, 1980, 30, 139, p99_us=2500.0)},
                                      cpu=60.0, temp=55.0), T0 + 2 * MIN)
    row = fleet.devices(T0 + 2 * MIN)[0]
    assert row["cpu_percent"] == 60.0 and row["rss_mb"] == 82.2 and row["temperature_c"] == 55.0
    assert row["p99_ms"] == 2.5 and row["p50_ms"] == 0.79 and row["throughput_per_s"] == 20.0
    assert row["error_rate"] == pytest.approx(20 / 1000)                   # over the last interval
    assert row["low_confidence_rate"] == pytest.approx(99 / 990, abs=1e-4)
    assert row["errors"] == 30
    assert fleet.series("dev-1", "error_rate") == [(T0 + MIN, 0.01), (T0 + 2 * MIN, 0.02)]
    assert fleet.series("dev-1", "latency_p99_ms") == [(T0 + MIN, 1.5), (T0 + 2 * MIN, 2.5)]
    assert fleet.series("dev-1", "temperature_c") == [(T0 + 2 * MIN, 55.0)]   # null: no sensor, no point
    assert fleet.series("dev-1", "cpu_percent") == [(T0 + MIN, 41.5), (T0 + 2 * MIN, 60.0)]
    kpi = fleet.snapshot(T0 + 2 * MIN)["models"][0]
    assert (kpi["model"], kpi["version"], kpi["devices"], kpi["devices_online"]) == ("digits", "3", 1, 1)
    assert (kpi["inputs"], kpi["predictions"], kpi["errors"]) == (2000, 1980, 30)
    assert kpi["error_rate"] == pytest.approx(30 / 2000)
    assert kpi["p99_ms"] == {"worst": 2.5, "median": 2.5, "devices": 1}
    assert kpi["reported_accuracy"] == 0.91


def test_metric_records_feed_the_same_view_and_a_new_boot_restarts_counters() -> None:
    fleet = FleetState()
    fleet.observe_status(status(), T0)
    fleet.observe_batch(batch([metric(T0 + MIN, inputs=500, predictions=490, errors=5)]), T0 + MIN)
    fleet.observe_batch(batch([metric(T0 + 2 * MIN, inputs=900, predictions=880, errors=9)], first_seq=2),
                        T0 + 2 * MIN)
    fleet.observe_status(status(boot="boot-b", t=T0 + 3 * MIN), T0 + 3 * MIN)
    fleet.observe_batch(batch([metric(T0 + 4 * MIN, inputs=100, predictions=100, errors=0)], boot="boot-b"),
                        T0 + 4 * MIN)
    kpi = fleet.models(T0 + 4 * MIN)[0]
    assert (kpi["inputs"], kpi["predictions"], kpi["errors"]) == (1000, 980, 9)
    assert fleet.device("dev-1", T0 + 4 * MIN)["restarts"] == 1  # type: ignore[index]
    assert fleet.series("dev-1", "error_rate") == [(T0 + MIN, 0.01), (T0 + 2 * MIN, 0.01), (T0 + 4 * MIN, 0.0)]
    assert fleet.devices(T0 + 4 * MIN)[0]["cpu_percent"] == 30.0


def test_a_late_snapshot_adds_points_but_no_counts() -> None:
    fleet = FleetState()
    fleet.observe_telemetry(telemetry(T0 + 10 * MIN, {"digits": pipe(5000, 5000, 0)}), T0 + 10 * MIN)
    # Drained from the device's buffer after the live view moved on.
    fleet.observe_batch(batch([metric(T0 + 2 * MIN, inputs=1000, predictions=1000, errors=0)]), T0 + 10 * MIN)
    assert fleet.models(T0 + 10 * MIN)[0]["inputs"] == 5000
    assert [t for t, _ in fleet.series("dev-1", "cpu_percent")] == [T0 + 2 * MIN, T0 + 10 * MIN]
    assert [t for t, _ in fleet.series("dev-1", "latency_p99_ms")] == [T0 + 2 * MIN, T0 + 10 * MIN]
    assert fleet.devices(T0 + 10 * MIN)[0]["cpu_percent"] == 41.5          # the newest gauge stays


def test_series_are_bounded_and_sorted() -> None:
    s = Series(3)
    for t, v in [(10, 1.0), (30, 3.0), (20, 2.0), (20, 2.5), (40, 4.0), (5, 0.5)]:
        s.add(t, v)
    assert s.points() == [(20, 2.5), (30, 3.0), (40, 4.0)]
    fleet = FleetState(series_points=5)
    for i in range(8):
        fleet.observe_telemetry(telemetry(T0 + i * MIN, cpu=float(i)), T0 + i * MIN)
    assert fleet.series("dev-1", "cpu_percent") == [(T0 + i * MIN, float(i)) for i in range(3, 8)]
    assert set(fleet.device("dev-1", T0 + 7 * MIN)["series"]) <= set(SERIES)  # type: ignore[index]
    assert fleet.series("nobody", "cpu_percent") == []
    with pytest.raises(ValueError, match="unknown series"):
        fleet.series("dev-1", "cpu")


def test_predictions_are_counted_per_model_version_with_low_confidence() -> None:
    fleet = FleetState(low_confidence=0.6)
    fleet.observe_status(status(models=(("digits", "3", "active"), ("digits", "4", "shadow"))), T0)
    fleet.observe_batch(batch([pred(score=0.9), pred(score=0.55), pred(score=None), pred(score=0.1, mv="4"),
                               pred(model="other", score=0.2)]), T0)
    kpis = {(k["model"], k["version"]): k for k in fleet.models(T0)}
    assert kpis[("digits", "3")]["prediction_records"] == 3
    assert kpis[("digits", "3")]["low_confidence_records"] == 1
    assert kpis[("digits", "3")]["low_confidence_rate"] == 0.5             # of the two with a score
    assert kpis[("digits", "4")]["low_confidence_rate"] == 1.0
    assert kpis[("other", "unknown")]["prediction_records"] == 1
    assert kpis[("digits", "3")]["devices"] == kpis[("digits", "4")]["devices"] == 1


def test_resent_records_are_counted_once() -> None:
    fleet = FleetState()
    fleet.observe_status(status(), T0)
    b = batch([pred(), pred(), metric(T0 + MIN)])
    fleet.observe_batch(b, T0)
    fleet.observe_batch(b, T0 + 1)
    fleet.observe_records("dev-1", b.records[1:], T0 + 2, boot_id="boot-a")
    assert fleet.models(T0)[0]["prediction_records"] == 2
    assert fleet.models(T0)[0]["inputs"] == 1000
    assert fleet.counters()["duplicates"] == 5
    other_boot = batch([pred()], boot="boot-b")
    fleet.observe_batch(other_boot, T0 + 3)
    assert fleet.models(T0)[0]["prediction_records"] == 3


def test_labels_give_accuracy_per_device_and_version() -> None:
    fleet = FleetState()
    fleet.observe_status(status(), T0)
    fleet.register_model("digits", "3", reference_accuracy=0.9)
    for i in range(10):
        fleet.observe_label("dev-1", "digits", "3", i < 7, T0)
    for _ in range(10):
        fleet.observe_label("dev-2", "digits", "3", True, T0)
    kpi = fleet.models(T0)[0]
    assert kpi["accuracy"] == {"n": 20, "accuracy": 0.85} and kpi["reference_accuracy"] == 0.9
    versions = fleet.device("dev-1", T0)["versions"]  # type: ignore[index]
    assert versions[0]["labels"] == {"n": 10, "correct": 7, "accuracy": 0.7}
    assert fleet.device("dev-2", T0) is None                                # labels alone do not make a device
    with pytest.raises(TypeError):
        fleet.observe_label("dev-1", "digits", "3", 1, T0)  # type: ignore[arg-type]


# -- odd input -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "payload", "counted"), [
    ("m", {"no": "pipeline"}, "m"),
    ("m", {"pipeline": "digits", "inputs": "many", "latency_us": [1, 2]}, "m"),
    ("m", {"pipeline": "digits", "errors": {"shape": -1}, "throughput_per_s": True}, "m"),
    ("d", {"model": "digits"}, "d"),
    ("d", {"model": "digits", "model_version": "3", "start_ms": 0, "end_ms": 1, "summary": {"schema": "x"}}, "d"),
    ("d", {"model": "digits", "model_version": "3", "start_ms": 5, "end_ms": 1, "summary": {}}, "d"),
    ("e", {"name": "Not An Event"}, "e"),
    ("e", {"name": "drift_alarm", "severity": "loud"}, "e"),
    ("e", {"name": "drift_alarm", "severity": "warning"}, "e"),              # names no model
    ("p", {"y": 3}, "p"),
    ("p", {"m": ["digits"], "p": 0.3}, "p"),
    ("p", {"m": "digits", "p": "high"}, "p"),
])
def test_bad_payloads_are_counted_and_skipped(kind: str, payload: dict[str, Any], counted: str) -> None:
    fleet = FleetState()
    fleet.observe_records("dev-1", [p.Record(1, kind, T0, payload), p.Record(2, "p", T0, {"m": "digits"})], T0)
    assert fleet.bad_payload == {counted: 1}
    assert fleet.device("dev-1", T0)["bad_payload"] == {counted: 1}  # type: ignore[index]
    assert fleet.models(T0)[-1]["prediction_records"] >= 1                # the next record still counted
    json.dumps(fleet.snapshot(T0), allow_nan=False)


def test_odd_records_and_unknown_kinds_never_raise() -> None:
    fleet = FleetState()
    fleet.observe_records("dev-1", [("x",), (1, 2, 3, 4), (1, "m", "soon", {}), (1, "p", T0, []), None,
                                    (1, "zz", T0, {"a": 1}), (2, "zz", T0, {})], T0)
    assert fleet.unknown_kinds == {"zz": 2}
    assert sum(fleet.bad_payload.values()) == 5
    fleet.observe_telemetry(p.Telemetry("dev-1", "boot-a", T0, {"cpu_percent": "hot", "pipelines": {"a": 1}}), T0)
    fleet.observe_telemetry(p.Telemetry("dev-1", "boot-a", T0, {"pipelines": []}), T0)
    assert fleet.bad_payload["telemetry"] == 2
    assert fleet.devices(T0)[0]["cpu_percent"] is None


def _json_values(floats: st.SearchStrategy[float]) -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | floats | st.text(max_size=8)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=8), inner, max_size=4), max_leaves=12)


_json = _json_values(st.floats())                                   # records are not re-checked: NaN too
_wire_json = _json_values(st.floats(allow_nan=False, allow_infinity=False))   # what Telemetry accepts
_keys = st.sampled_from(["pipeline", "model_version", "inputs", "predictions", "errors", "latency_us",
                         "throughput_per_s", "drift_alarm", "labels", "cpu_percent", "temperature_c", "m", "p",
                         "mv", "name", "severity", "ref", "detail", "model", "start_ms", "end_ms", "summary",
                         "pipelines"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["m", "d", "e", "p", "q"]), st.dictionaries(_keys, _json, max_size=8)),
                max_size=6), st.dictionaries(_keys, _wire_json, max_size=6))
def test_any_payload_content_is_counted_never_raised(records: list[tuple[str, dict[str, Any]]],
                                                     metrics: dict[str, Any]) -> None:
    fleet = FleetState()
    fleet.observe_records("dev-1", [p.Record(i, k, T0 + i, d) for i, (k, d) in enumerate(records)], T0,
                          boot_id="boot-a")
    fleet.observe_telemetry(p.Telemetry("dev-1", "boot-a", T0, metrics), T0)
    fleet.snapshot(T0)
    fleet.devices(T0)
    fleet.device("dev-1", T0)


# -- drift -----------------------------------------------------------------------------------------

WINDOW = 50


@functools.cache
def reference() -> Reference:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3_000, 3))
    return load_reference(build_reference(x, classify(x), calibration=CalibrationSettings(
        window=WINDOW, n_simulations=2_000, universes=4)))


def classify(x: np.ndarray) -> np.ndarray:
    return (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1).astype(np.int64)


def drift_record(monitor: DriftMonitor, start_ms: int, end_ms: int, version: str = "1") -> tuple[str, int, dict]:
    env = p.DriftSummary("m", version, start_ms, end_ms, monitor.take_summary().to_dict())
    return ("d", end_ms, env.to_payload())


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.sampled_from([0.0, 0.3, 2.0])), min_size=1, max_size=4),
       st.integers(0, 2**32 - 1), st.randoms(use_true_random=False), st.booleans())
def test_fleet_drift_merge_equals_the_summary_of_all_windows(devices: list[tuple[int, float]], seed: int,
                                                             rnd: Any, with_reference: bool) -> None:
    ref = reference()
    rng = np.random.default_rng(seed)
    chunks = [rng.normal(size=(windows * WINDOW, 3)) + shift for windows, shift in devices]
    whole = DriftMonitor(ref, model="m")
    records = []
    offset = 0
    for i, x in enumerate(chunks):
        whole.update(x, classify(x), offset)
        mon = DriftMonitor(ref, model="m")
        mon.update(x, classify(x), offset)
        records.append((f"dev-{i}", drift_record(mon, T0 + offset, T0 + offset + len(x))))
        offset += len(x)
    rnd.shuffle(records)                                                   # arrival order does not matter
    fleet = FleetState()
    if with_reference:
        fleet.register_model("m", "1", reference=ref)
    for dev, rec in records:
        fleet.observe_batch(batch([rec], dev=dev), T0)
        fleet.observe_batch(batch([rec], dev=dev, first_seq=7), T0)        # resent under another key: one window
    merged = fleet.fleet_drift("m", "1")
    expect = whole.summary().to_dict()
    assert merged is not None
    for key in ("n", "windows", "start", "end", "top", "score"):
        assert merged[key] == expect[key], key
    assert merged["features"]["hist"] == expect["features"]["hist"]
    assert merged["features"]["nan"] == expect["features"]["nan"]
    assert merged["predictions"]["counts"] == expect["predictions"]["counts"]
    for key in ("mean", "std"):   # sent rounded to a few digits of the feature's spread (about 1 here)
        np.testing.assert_allclose(np.array(merged["features"][key], dtype=float),
                                   np.array(expect["features"][key], dtype=float), rtol=2e-3, atol=2e-3)
    if with_reference:
        assert merged["distances"] == expect["distances"]
        for key in ("psi", "js", "chi2"):
            assert merged["predictions"][key] == pytest.approx(expect["predictions"][key], rel=1e-9)
    else:
        assert "distances" not in merged
    entry = fleet.drift(T0)[0]
    assert entry["summaries"] == len(devices) and entry["devices"] == len(devices)
    assert entry["score"] == max(entry["device_scores"].values()) == expect["score"]


def test_drift_alarms_from_summaries_and_events() -> None:
    ref = reference()
    rng = np.random.default_rng(5)
    fleet = FleetState()
    for dev in ("dev-1", "dev-2", "dev-3"):
        fleet.observe_status(status(dev=dev, models=(("m", "1", "active"),)), T0)
    calm, shifted = DriftMonitor(ref, model="m"), DriftMonitor(ref, model="m")
    calm.update(x := rng.normal(size=(4 * WINDOW, 3)), classify(x))
    shifted.update(x := rng.normal(size=(4 * WINDOW, 3)) + 2.0, classify(x))
    assert shifted.open_alarms and not calm.open_alarms
    fleet.observe_batch(batch([drift_record(calm, T0, T0 + MIN)], dev="dev-1"), T0 + MIN)
    fleet.observe_batch(batch([drift_record(shifted, T0, T0 + MIN)], dev="dev-2"), T0 + MIN)
    # dev-3 only reports an event, as the agent does when an alarm opens.
    fleet.observe_batch(batch([event("drift_alarm", T0 + MIN, severity="warning", ref="m",
                                     detail={"kind": "data"})], dev="dev-3"), T0 + MIN)
    entry = fleet.drift(T0 + MIN)[0]
    assert entry["alarm_devices"] == ["dev-2", "dev-3"]
    assert entry["device_scores"]["dev-2"] > 1.0 > entry["device_scores"]["dev-1"]
    kpi = fleet.models(T0 + MIN)[0]
    assert kpi["drift_alarms"] == 2 and kpi["drift_score"] == entry["score"]
    rows = {r["id"]: r for r in fleet.devices(T0 + MIN)}
    assert rows["dev-2"]["alarm"] and rows["dev-2"]["alarms"] == ["m@1"] and not rows["dev-1"]["alarm"]
    assert fleet.series("dev-2", "drift_score") == [(T0 + MIN, rows["dev-2"]["drift_score"])]

    # Cleared by an event; an older summary saying "open" does not reopen it.
    fleet.observe_batch(batch([event("drift_cleared", T0 + 2 * MIN, ref="m", detail={"kind": "data"})],
                              dev="dev-3", first_seq=2), T0 + 2 * MIN)
    fleet.observe_batch(batch([event("drift_alarm", T0 + MIN - 1, ref="m", detail={"kind": "data"})],
                              dev="dev-3", first_seq=3), T0 + 2 * MIN)
    # dev-2's monitor sees calm data again (its CUSUM takes a couple of dozen windows to settle): its next
    # summary closes the alarm.
    for _ in range(40):
        shifted.update(x := rng.normal(size=(WINDOW, 3)), classify(x))
        if not shifted.open_alarms:
            break
    assert not shifted.open_alarms
    fleet.observe_batch(batch([drift_record(shifted, T0 + MIN, T0 + 2 * MIN)], dev="dev-2", first_seq=2),
                        T0 + 2 * MIN)
    assert fleet.drift(T0 + 2 * MIN)[0]["alarm_devices"] == []
    assert fleet.drift(T0 + 2 * MIN)[0]["summaries"] == 3


def test_snapshot_flag_new_boot_and_new_version_close_alarms() -> None:
    fleet = FleetState()
    fleet.observe_status(status(models=(("digits", "3", "active"),)), T0)
    fleet.observe_telemetry(telemetry(T0 + MIN, {"digits": pipe(drift_alarm=True)}), T0 + MIN)
    assert fleet.drift(T0)[0]["alarm_devices"] == ["dev-1"]
    fleet.observe_telemetry(telemetry(T0 + 2 * MIN, {"digits": pipe(drift_alarm=False)}), T0 + 2 * MIN)
    assert fleet.drift(T0) == []
    fleet.observe_batch(batch([event("drift_alarm", T0 + 3 * MIN, ref="digits")]), T0 + 3 * MIN)
    assert fleet.models(T0 + 3 * MIN)[0]["drift_alarms"] == 1
    fleet.observe_status(status(boot="boot-b", t=T0 + 4 * MIN), T0 + 4 * MIN)    # restarted: monitor is new
    assert fleet.models(T0 + 4 * MIN)[0]["drift_alarms"] == 0
    fleet.observe_batch(batch([event("drift_alarm", T0 + 5 * MIN, ref="digits")], boot="boot-b"), T0 + 5 * MIN)
    fleet.observe_telemetry(telemetry(T0 + 6 * MIN, {"digits": pipe(version="4")}, boot="boot-b"), T0 + 6 * MIN)
    kpis = {k["version"]: k for k in fleet.models(T0 + 6 * MIN)}
    assert kpis["3"]["drift_alarms"] == 0 and kpis["4"]["devices"] == 1


def test_snapshot_is_json_and_complete() -> None:
    fleet = FleetState()
    fleet.observe_status(status(), T0)
    fleet.observe_telemetry(telemetry(T0 + MIN), T0 + MIN)
    fleet.observe_batch(batch([pred(), metric(T0 + MIN), event("model_swapped", ref="ro-1")]), T0 + MIN)
    snap = fleet.snapshot(T0 + MIN)
    assert json.loads(json.dumps(snap, allow_nan=False)) == snap
    assert set(snap) >= {"devices", "models", "drift", "time_ms"} and snap["time_ms"] == T0 + MIN
    dev = fleet.device("dev-1", T0 + MIN)
    assert dev is not None and json.loads(json.dumps(dev, allow_nan=False)) == dev
    assert dev["events"][0]["name"] == "model_swapped" and dev["event_counts"] == {"model_swapped": 1}
    assert set(dev["series"]) == {"throughput_per_s", "latency_p50_ms", "latency_p99_ms", "error_rate", "cpu_percent",
                                  "rss_mb", "temperature_c", "low_confidence_rate"}
    assert fleet.device("nobody", T0) is None


def test_an_empty_window_keeps_the_last_rates() -> None:
    """A metric record and a telemetry snapshot a few ms apart: the second window holds no input, and
    says nothing about the error rate; the rate of the last window with inputs stands."""
    fleet = FleetState()
    fleet.observe_status(status(), T0)
    fleet.observe_telemetry(telemetry(T0, {"digits": pipe(inputs=1000, errors=0)}), T0)
    fleet.observe_telemetry(telemetry(T0 + 60_000, {"digits": pipe(inputs=2000, errors=20)}), T0 + 60_000)
    (row,) = fleet.devices(T0 + 60_000)
    assert row["error_rate"] == pytest.approx(0.02)
    fleet.observe_telemetry(telemetry(T0 + 60_010, {"digits": pipe(inputs=2000, errors=20)}), T0 + 60_010)
    (row,) = fleet.devices(T0 + 60_010)
    assert row["error_rate"] == pytest.approx(0.02)
    fleet.observe_telemetry(telemetry(T0 + 120_000, {"digits": pipe(inputs=3000, errors=20)}), T0 + 120_000)
    (row,) = fleet.devices(T0 + 120_000)
    assert row["error_rate"] == 0.0


def test_a_late_will_of_an_earlier_connection_does_not_mark_a_reconnected_device_offline() -> None:
    fleet = FleetState()
    online = p.Status("dev-1", True, "boot-a", T0, "0.1.0", (p.ModelStatus("digits", "3", "active"),), (), 2)
    fleet.observe_status(online, T0)
    stale = p.last_will("dev-1", "boot-a", time_ms=T0 - 5000, conn=1)
    fleet.observe_status(stale, T0 + 10)
    assert fleet.state("dev-1", T0 + 10) == "online"
    fleet.observe_status(p.last_will("dev-1", "boot-a", time_ms=T0, conn=2), T0 + 20)
    assert fleet.state("dev-1", T0 + 20) == "offline"
