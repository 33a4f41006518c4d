"""The sync protocol: round trips, a decoder that only ever raises ProtocolError, size-capped batch
packing, ack ranges, and topic rules (no wildcards, bounded lengths)."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edge_runtime.core import protocol as p
from edge_runtime.core.protocol import (
    DEFAULT_MAX_BYTES,
    DOWN_KINDS,
    MAX_TOPIC_BYTES,
    PROTOCOL_ERROR_REASONS,
    UP_KINDS,
    Ack,
    BootRanges,
    Command,
    DriftSummary,
    Event,
    Label,
    LabelFeedback,
    ModelStatus,
    PredictionKey,
    ProtocolError,
    Record,
    RecordBatch,
    Status,
    Telemetry,
    build_topic,
    decode,
    device_subscription,
    fleet_subscription,
    last_will,
    pack_batches,
    parse_topic,
    ranges_contain,
    ranges_count,
    ranges_to_seqs,
    seqs_to_ranges,
    shared_subscription,
    validate_device_id,
)
from edge_runtime.errors import EdgeRuntimeError

DEV = "pi-0042"
BOOT = "b7f3c2a1"
ALL_KINDS = UP_KINDS + DOWN_KINDS
ALL_TOPICS = [build_topic(DEV, k) for k in ALL_KINDS]

# ------------------------------------------------------------------------------------------------
# Strategies

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True)
u63 = st.integers(min_value=0, max_value=2**63 - 1)
times = st.integers(min_value=0, max_value=2**45)
short_text = st.text(max_size=40)
json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**64), max_value=2**64)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(json_scalars,
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=5)
record_kinds = st.sampled_from([p.PREDICTION, p.METRIC, p.DRIFT, p.EVENT]) | st.from_regex(
    r"[a-z][a-z0-9_]{0,15}", fullmatch=True)
records = st.builds(Record, u63, record_kinds, times, json_objects)
ranges = st.sets(st.integers(min_value=0, max_value=10_000), max_size=60).map(seqs_to_ranges)

statuses = st.builds(Status, ids, st.booleans(), ids, times, st.text(max_size=128),
                     st.lists(st.builds(ModelStatus, short_text, short_text, short_text), max_size=3).map(tuple))
telemetries = st.builds(Telemetry, ids, ids, times, json_objects)
batches = st.builds(RecordBatch, ids, ids, st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,40}", fullmatch=True),
                    st.lists(records, min_size=1, max_size=8).map(tuple))
acks = st.builds(Ack, ids, ids,
                 st.lists(st.tuples(ids, ranges), max_size=3, unique_by=lambda t: t[0])
                 .map(lambda xs: tuple(BootRanges(b, r) for b, r in xs)),
                 st.sampled_from(["", "bad_type", "oversize"]))
label_values = (st.integers(min_value=-(2**40), max_value=2**40) | st.floats(allow_nan=False, allow_infinity=False)
                | st.text(max_size=30))
labels = st.builds(Label, st.builds(PredictionKey, ids, u63) | st.text(min_size=1, max_size=128), label_values)
feedbacks = st.builds(LabelFeedback, ids, ids, st.lists(labels, max_size=6).map(tuple))
commands = st.builds(Command, ids, st.sampled_from(["rollout", "config"]), ids, times, json_objects,
                     st.none() | times)
messages = st.one_of(statuses, telemetries, batches, acks, feedbacks, commands)


def decode_or_error(topic: str, payload: bytes, **kw: Any) -> p.Message | ProtocolError:
    """Anything but a Message or a ProtocolError escapes and fails the test."""
    try:
        return decode(topic, payload, **kw)
    except ProtocolError as e:
        assert e.reason in PROTOCOL_ERROR_REASONS, e
        assert str(e).startswith(e.reason)
        return e


def error_of(topic: str, payload: bytes | str | dict[str, Any], **kw: Any) -> ProtocolError:
    if isinstance(payload, dict):
        payload = json.dumps(payload, separators=(",", ":"))
    if isinstance(payload, str):
        payload = payload.encode()
    with pytest.raises(ProtocolError) as info:
        decode(topic, payload, **kw)
    return info.value


# ------------------------------------------------------------------------------------------------
# Round trips


@settings(max_examples=300, deadline=None)
@given(messages)
def test_every_message_type_round_trips(m: p.Message) -> None:
    wire = m.to_wire()
    back = decode(m.topic, wire)
    assert back == m
    assert type(back) is type(m)
    assert back.to_wire() == wire  # one canonical encoding


@given(st.builds(DriftSummary, short_text, short_text, st.just(10), st.integers(10, 2**40), json_objects), u63, times)
def test_drift_summary_record_round_trip(d: DriftSummary, seq: int, t: int) -> None:
    r = d.to_record(seq, t)
    assert r.kind == p.DRIFT
    assert DriftSummary.from_record(r) == d
    assert DriftSummary.from_payload(json.loads(json.dumps(d.to_payload()))) == d


@given(st.builds(Event, st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True), st.sampled_from(p.SEVERITIES),
                 st.text(max_size=60), st.just("") | ids, st.none() | json_objects), u63, times)
def test_event_record_round_trip(e: Event, seq: int, t: int) -> None:
    r = e.to_record(seq, t)
    assert r.kind == p.EVENT
    assert Event.from_record(r) == e
    batch = RecordBatch(DEV, BOOT, "x", (r,))
    got = decode(batch.topic, batch.to_wire())
    assert isinstance(got, RecordBatch)
    assert Event.from_record(got.records[0]) == e


def test_typed_record_views_refuse_the_wrong_kind_and_say_which_seq() -> None:
    with pytest.raises(ProtocolError, match="expected 'd'") as info:
        DriftSummary.from_record(Record(5, p.EVENT, 0, {}))
    assert info.value.seq == 5
    with pytest.raises(ProtocolError) as info:
        Event.from_record(Record(6, p.EVENT, 0, {"severity": "info"}))
    assert (info.value.reason, info.value.detail, info.value.seq) == ("missing_field", "name", 6)
    with pytest.raises(ProtocolError, match="severity"):
        Event("x", severity="fatal")
    with pytest.raises(ProtocolError, match="end_ms"):
        DriftSummary("m", "1", 10, 9, {})


# ------------------------------------------------------------------------------------------------
# The decoder never raises anything but ProtocolError


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(ALL_TOPICS), st.binary(max_size=600))
def test_random_bytes_on_every_topic_give_only_protocol_errors(topic: str, data: bytes) -> None:
    decode_or_error(topic, data)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(ALL_TOPICS), json_values, st.booleans())
def test_random_json_on_every_topic_gives_only_protocol_errors(topic: str, value: Any, versioned: bool) -> None:
    if versioned and isinstance(value, dict):
        value = {**value, "v": 1}
    decode_or_error(topic, json.dumps(value).encode())


def _paths(v: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(v, dict):
        for k, x in v.items():
            out += _paths(x, (*path, k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            out += _paths(x, (*path, i))
    return out


def _mutate(obj: Any, path: tuple[Any, ...], new: Any, delete: bool) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(obj, dict):
        obj = dict(obj)
        if delete and not rest:
            del obj[head]
        else:
            obj[head] = _mutate(obj.get(head), rest, new, delete)
    else:
        obj = list(obj)
        if delete and not rest:
            del obj[head]
        else:
            obj[head] = _mutate(obj[head], rest, new, delete)
    return obj


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages, st.data())
def test_valid_messages_with_one_value_changed_give_a_message_or_a_protocol_error(m: p.Message,
                                                                                   data: st.DataObject) -> None:
    obj = json.loads(m.to_wire())
    path = data.draw(st.sampled_from(_paths(obj)))
    new = data.draw(json_values | st.sampled_from([True, -1, 1.5, 2**63, "", "a/b", "+", None, [], {}]))
    mutated = _mutate(obj, path, new, delete=data.draw(st.booleans()))
    decode_or_error(m.topic, json.dumps(mutated).encode())


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80) | st.sampled_from(ALL_TOPICS).map(lambda t: t + "/x"))
def test_random_topics_give_only_protocol_errors(topic: str) -> None:
    decode_or_error(topic, b'{"v":1}')


# ------------------------------------------------------------------------------------------------
# Each check gives its own reason


def test_oversize_is_checked_before_parsing_and_the_cap_is_configurable() -> None:
    topic = build_topic(DEV, "telemetry")
    e = error_of(topic, b" " * 300_000)
    assert (e.reason, e.detail) == ("oversize", "300000 bytes > 262144")
    assert str(e).startswith("oversize: 300000 bytes > 262144")
    assert e.topic == topic
    ok = Telemetry(DEV, BOOT, 1, {"x": "y" * 200}).to_wire()
    assert isinstance(decode(topic, ok), Telemetry)
    assert error_of(topic, ok, max_bytes=100).reason == "oversize"
    assert isinstance(decode(topic, ok, max_bytes=len(ok)), Telemetry)


def test_senders_refuse_what_receivers_would_reject() -> None:
    big = RecordBatch(DEV, BOOT, "b", tuple(Record(i, "p", 0, {"x": "y" * 1000}) for i in range(300)))
    with pytest.raises(ProtocolError, match="oversize"):
        big.to_wire()
    assert len(big.to_wire(max_bytes=1 << 20)) > DEFAULT_MAX_BYTES
    with pytest.raises(ProtocolError, match="oversize: metrics is"):
        Telemetry(DEV, BOOT, 1, {"x": "y" * p.MAX_OBJECT_BYTES})
    with pytest.raises(ProtocolError, match="bad_value: metrics is not JSON"):
        Telemetry(DEV, BOOT, 1, {"x": float("nan")})
    with pytest.raises(ProtocolError, match="not JSON"):
        Command(DEV, "config", "c1", 1, {"x": {1, 2}})


def test_version_reasons() -> None:
    topic = build_topic(DEV, "status")
    good = json.loads(last_will(DEV, BOOT, time_ms=5).to_wire())
    assert str(error_of(topic, {**good, "v": 2})) .startswith("wrong_version: 2")
    assert error_of(topic, {k: v for k, v in good.items() if k != "v"}).detail == "v"
    assert error_of(topic, {**good, "v": "1"}).reason == "bad_type"
    assert error_of(topic, {**good, "v": True}).reason == "bad_type"
    assert error_of(topic, {**good, "v": 1.0}).reason == "bad_type"


EXAMPLES: dict[str, p.Message] = {
    "status": Status(DEV, True, BOOT, 5, "0.1.0", (ModelStatus("digits", "3", "active"),)),
    "telemetry": Telemetry(DEV, BOOT, 5, {"cpu": 1.5}),
    "records": RecordBatch(DEV, BOOT, "b:1-2", (Record(1, "p", 5, {"y": 1}), Record(2, "e", 6, {"name": "x"}))),
    "ack": Ack(DEV, "b:1-2", (BootRanges(BOOT, ((1, 2),)),)),
    "labels": LabelFeedback(DEV, "fb", (Label(PredictionKey(BOOT, 1), 7), Label("img-1", "cat"))),
    "rollout": Command(DEV, "rollout", "r1", 5, {"bundle": "x"}),
    "config": Command(DEV, "config", "c1", 5, {}, 99),
}
OPTIONAL = {"status": {"agent_version", "models"}, "ack": {"rejected"}, "rollout": {"expires_ms"},
            "config": {"expires_ms"}}


@pytest.mark.parametrize("kind", list(EXAMPLES))
def test_each_missing_required_field_is_named(kind: str) -> None:
    m = EXAMPLES[kind]
    obj = json.loads(m.to_wire())
    for key in obj:
        if key == "v" or key in OPTIONAL.get(kind, set()):
            continue
        e = error_of(m.topic, {k: v for k, v in obj.items() if k != key})
        assert (e.reason, e.detail) == ("missing_field", key), str(e)
    for key in OPTIONAL.get(kind, set()) & set(obj):
        assert decode(m.topic, json.dumps({k: v for k, v in obj.items() if k != key}).encode()).device_id == DEV


@pytest.mark.parametrize(("kind", "path", "value", "expected"), [
    ("records", ("records", 0, 0), "7", "bad_type: records[0].seq is str, expected int"),
    ("records", ("records", 0, 0), True, "bad_type: records[0].seq is bool, expected int"),
    ("records", ("records", 0, 0), 1.0, "bad_type: records[0].seq is float, expected int"),
    ("records", ("records", 0, 0), -1, "bad_value: records[0].seq is -1"),
    ("records", ("records", 0, 0), 2**63, "bad_value: records[0].seq is 9223372036854775808"),
    ("records", ("records", 1, 3), [], "bad_type: records[1].payload is list, expected object"),
    ("records", ("records", 1, 1), "Pred", "bad_value: records[1].kind 'Pred' is not an id"),
    ("records", ("records", 1), [1, "p", 2], "bad_value: records[1] has 3 items"),
    ("records", ("records",), [], "bad_value: records is empty"),
    ("records", ("records",), {}, "bad_type: records is object, expected list"),
    ("status", ("online",), 1, "bad_type: online is int, expected bool"),
    ("status", ("boot_id",), "a/b", "bad_value: boot_id 'a/b' is not an id"),
    ("status", ("models", 0), "digits", "bad_type: models[0] is str, expected object"),
    ("status", ("models", 0, "name"), None, "bad_type: models[0].name is null, expected str"),
    ("telemetry", ("metrics",), [1], "bad_type: metrics is list, expected object"),
    ("ack", ("acked", 0, "ranges"), [[3, 1]], "bad_value: acked[0].ranges[0] is [3, 1]: last < first"),
    ("ack", ("acked", 0, "ranges"), [[1, 2], [3, 4]], "bad_value: acked[0].ranges[1] starts at 3"),
    ("ack", ("acked", 0, "ranges"), [[5, 6], [1, 2]], "bad_value: acked[0].ranges[1] starts at 1"),
    ("ack", ("acked", 0, "ranges"), [[1, 2, 3]], "bad_value: acked[0].ranges[0] has 3 items"),
    ("ack", ("rejected",), "Not A Reason", "bad_value: rejected"),
    ("labels", ("labels", 0, 1), True, "bad_type: labels[0].label is bool, expected int, float or str"),
    ("labels", ("labels", 0, 0), [BOOT], "bad_value: labels[0].ref has 1 items"),
    ("labels", ("labels", 1, 0), "", "bad_value: labels[1].ref is empty"),
    ("labels", ("labels", 0, 0), [BOOT, "7"], "bad_type: labels[0].ref.seq is str"),
    ("rollout", ("params",), "x", "bad_type: params is str, expected object"),
    ("config", ("expires_ms",), "soon", "bad_type: expires_ms is str, expected int"),
])
def test_wrong_types_and_values_are_named(kind: str, path: tuple[Any, ...], value: Any, expected: str) -> None:
    m = EXAMPLES[kind]
    e = error_of(m.topic, _mutate(json.loads(m.to_wire()), path, value, delete=False))
    assert str(e).startswith(expected), str(e)


def test_a_bad_batch_names_its_batch_so_the_cloud_can_reject_it() -> None:
    m = EXAMPLES["records"]
    e = error_of(m.topic, _mutate(json.loads(m.to_wire()), ("records", 0, 0), "x", delete=False))
    assert e.batch_id == "b:1-2"
    assert "[batch b:1-2]" in str(e)
    reject = Ack(DEV, e.batch_id, (), rejected=e.reason)
    assert decode(reject.topic, reject.to_wire()) == reject


@pytest.mark.parametrize(("payload", "detail"), [
    (b"", None),
    (b"{", "Expecting property name"),
    (b"\xff\xfe{}", "utf-8"),
    (b'{"v":1,"x":NaN}', "NaN is not allowed"),
    (b'{"v":1,"x":-Infinity}', "-Infinity is not allowed"),
    (b'{"v":1,"x":1e999}', "out of range"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"v":1,"x":' + b"9" * 5000 + b"}", "digits"),
    ('\ufeff{"v":1}'.encode(), "Expecting value"),  # a UTF-8 BOM is not JSON
    (b'{"v":1} {"v":1}', "Extra data"),
])
def test_bad_json_and_empty_payloads(payload: bytes, detail: str | None) -> None:
    e = error_of(build_topic(DEV, "status"), payload)
    if detail is None:
        assert e.reason == "empty"
    else:
        assert e.reason == "bad_json"
        assert detail in e.detail, e.detail


def test_non_object_messages_and_non_bytes_payloads() -> None:
    topic = build_topic(DEV, "status")
    assert str(error_of(topic, b"[]")).startswith("bad_type: message is list, expected object")
    assert str(error_of(topic, b'"x"')).startswith("bad_type: message is str")
    with pytest.raises(ProtocolError, match="payload is str, expected bytes"):
        decode(topic, "{}")  # type: ignore[arg-type]
    m = last_will(DEV, BOOT, time_ms=1)
    assert decode(topic, memoryview(m.to_wire())) == m
    assert decode(topic, bytearray(m.to_wire())) == m


def test_unknown_fields_are_ignored_within_v1() -> None:
    m = EXAMPLES["status"]
    obj = {**json.loads(m.to_wire()), "added_in_v1_1": [1, 2]}
    assert decode(m.topic, json.dumps(obj).encode()) == m


def test_protocol_error_is_an_edge_runtime_error_with_structured_fields() -> None:
    e = ProtocolError("bad_type", "seq is str, expected int", topic="t", batch_id="b", seq=3)
    assert isinstance(e, EdgeRuntimeError)
    assert (e.reason, e.detail, e.topic, e.batch_id, e.seq) == ("bad_type", "seq is str, expected int", "t", "b", 3)
    assert str(e) == "bad_type: seq is str, expected int [seq 3] [batch b] [topic t]"
    assert len(str(ProtocolError("bad_topic", topic="x" * 10_000))) < 200


# ------------------------------------------------------------------------------------------------
# pack_batches


def _fixed_overhead(boot: str) -> int:
    return len(f'{{"v":1,"batch_id":"{boot}:{2**63 - 1}-{2**63 - 1}","boot_id":"{boot}","records":[]}}')


@settings(max_examples=300, deadline=None)
@given(st.lists(records, max_size=60, unique_by=lambda r: r.seq), st.integers(min_value=250, max_value=4000),
       st.none() | st.integers(min_value=1, max_value=10), ids)
def test_pack_batches_respects_the_cap_and_keeps_every_record_in_order(recs: list[Record], cap: int,
                                                                        max_records: int | None, boot: str) -> None:
    try:
        packed = pack_batches(recs, cap, device_id=DEV, boot_id=boot, max_records=max_records)
    except ProtocolError as e:
        # Only a record too big to travel alone may stop the packing, and it is named.
        assert e.reason == "oversize"
        bad = next(r for r in recs if r.seq == e.seq)
        assert _fixed_overhead(boot) + len(json.dumps(bad, separators=(",", ":"))) > cap
        return
    got: list[Record] = []
    prev_stop = 0
    for k, b in enumerate(packed):
        assert len(b.payload) <= cap
        assert b.start == prev_stop < b.stop
        prev_stop = b.stop
        assert max_records is None or b.stop - b.start <= max_records
        m = decode(b.topic, b.payload, max_bytes=cap)
        assert isinstance(m, RecordBatch)
        assert (m.device_id, m.boot_id, m.batch_id) == (DEV, boot, b.batch_id)
        assert list(m.records) == recs[b.start:b.stop]
        assert m.to_wire(max_bytes=cap) == b.payload
        assert b.ranges == m.ranges == seqs_to_ranges(r.seq for r in recs[b.start:b.stop])
        assert b.batch_id == f"{boot}:{recs[b.start].seq}-{recs[b.stop - 1].seq}"
        got += m.records
        if k < len(packed) - 1 and (max_records is None or b.stop - b.start < max_records):
            # Greedy: the next record did not fit (give or take the room kept for the longest batch id).
            nxt = len(json.dumps(recs[b.stop], separators=(",", ":")))
            assert len(b.payload) + 1 + nxt > cap - 40
    assert prev_stop == len(recs)
    assert got == recs


def test_pack_batches_fills_default_sized_messages() -> None:
    recs = [Record(i, p.PREDICTION, 1764167513000 + i, {"m": "digits", "y": i % 10, "p": 0.93}) for i in range(10_000)]
    packed = pack_batches(recs, device_id=DEV, boot_id=BOOT)
    assert all(DEFAULT_MAX_BYTES - 200 < len(b.payload) <= DEFAULT_MAX_BYTES for b in packed[:-1])
    assert sum(b.stop - b.start for b in packed) == 10_000
    assert [b.ranges for b in packed] == [((b.start, b.stop - 1),) for b in packed]
    assert pack_batches([], device_id=DEV, boot_id=BOOT) == []


def test_pack_batches_names_the_record_it_cannot_send() -> None:
    recs = [Record(1, "p", 0, {}), Record(2, "p", 0, {"x": "y" * 1000}), Record(3, "p", 0, {})]
    with pytest.raises(ProtocolError, match="oversize: record is") as info:
        pack_batches(recs, 500, device_id=DEV, boot_id=BOOT)
    assert info.value.seq == 2
    with pytest.raises(ProtocolError, match="not JSON") as info:
        pack_batches([Record(1, "p", 0, {}), Record(7, "p", 0, {"x": float("inf")})], device_id=DEV, boot_id=BOOT)
    assert info.value.seq == 7
    with pytest.raises(ProtocolError, match="kind") as info:
        pack_batches([(8, "BAD", 0, {})], device_id=DEV, boot_id=BOOT)
    assert info.value.seq == 8
    with pytest.raises(ProtocolError, match="bad_device_id"):
        pack_batches([], device_id="a/b", boot_id=BOOT)
    with pytest.raises(ProtocolError, match="max_records"):
        pack_batches([], device_id=DEV, boot_id=BOOT, max_records=0)


def test_pack_batches_accepts_plain_rows() -> None:
    rows = [(1, "p", 10, {"y": 1}), [2, "m", 11, {"cpu": 3}]]
    (b,) = pack_batches(rows, device_id=DEV, boot_id=BOOT)  # type: ignore[arg-type]  # lists work too
    m = decode(b.topic, b.payload)
    assert isinstance(m, RecordBatch)
    assert m.records == (Record(1, "p", 10, {"y": 1}), Record(2, "m", 11, {"cpu": 3}))


# ------------------------------------------------------------------------------------------------
# Ranges


@given(st.lists(st.integers(min_value=0, max_value=2**63 - 1), max_size=200)
       | st.lists(st.integers(min_value=0, max_value=300), max_size=200))
def test_seqs_and_ranges_round_trip(seqs: list[int]) -> None:
    rs = seqs_to_ranges(seqs)
    assert all(a <= b for a, b in rs)
    assert all(rs[i][1] + 1 < rs[i + 1][0] for i in range(len(rs) - 1))  # canonical: sorted, apart
    assert ranges_count(rs) == len(set(seqs))
    if ranges_count(rs) <= 10_000:
        assert ranges_to_seqs(rs) == sorted(set(seqs))
    for s in list(seqs)[:20]:
        assert ranges_contain(rs, s)
        assert not ranges_contain(rs, s + 1) or s + 1 in set(seqs)
    assert not ranges_contain(rs, -1)
    ack = Ack(DEV, "b", (BootRanges(BOOT, rs),))
    assert decode(ack.topic, ack.to_wire()) == ack


@given(ranges)
def test_ranges_to_seqs_and_back(rs: tuple[tuple[int, int], ...]) -> None:
    assert seqs_to_ranges(ranges_to_seqs(rs)) == rs


def test_ranges_from_the_network_are_not_expanded_blindly() -> None:
    with pytest.raises(ProtocolError, match="limit"):
        ranges_to_seqs([(0, 2**62)])
    assert ranges_count([(0, 2**62)]) == 2**62 + 1
    assert ranges_to_seqs([(3, 5), (9, 9)]) == [3, 4, 5, 9]
    with pytest.raises(ProtocolError, match="appears twice"):
        Ack(DEV, "b", (BootRanges(BOOT, ((1, 1),)), BootRanges(BOOT, ((3, 3),))))


# ------------------------------------------------------------------------------------------------
# Topics


@given(ids, st.sampled_from(ALL_KINDS))
def test_topics_round_trip(device_id: str, kind: str) -> None:
    t = build_topic(device_id, kind)
    info = parse_topic(t)
    assert info == (device_id, "up" if kind in UP_KINDS else "down", kind)
    assert t.isascii()
    assert len(t.encode()) <= MAX_TOPIC_BYTES


@pytest.mark.parametrize("bad", ["", "+", "#", "a+", "a#b", "a/b", "$SYS", "$share", "-a", ".", "..", "_x",
                                 "a b", "a\x00b", "ü", "a\nb", "x" * 65, "a:b", "a*b", "a\\b"])
def test_bad_device_ids_are_refused_everywhere(bad: str) -> None:
    with pytest.raises(ProtocolError, match="bad_device_id"):
        validate_device_id(bad)
    with pytest.raises(ProtocolError, match="bad_device_id"):
        build_topic(bad, "status")
    with pytest.raises(ProtocolError, match="bad_device_id"):
        device_subscription(bad)
    if "/" not in bad:
        with pytest.raises(ProtocolError) as info:
            parse_topic(f"edge/v1/{bad}/status")
        assert info.value.reason in ("bad_device_id", "bad_topic")


@pytest.mark.parametrize(("topic", "reason"), [
    ("edge/v1/+/status", "bad_device_id"),
    ("edge/v1/#", "bad_topic"),
    ("edge/v1/pi/#", "unknown_kind"),
    ("edge/v1/pi/+", "unknown_kind"),
    ("edge/v1/pi/cmd/+", "unknown_kind"),
    ("edge/v1/pi/cmd/#", "unknown_kind"),
    ("edge/v2/pi/status", "bad_topic"),
    ("edge/v1/pi/status/", "bad_topic"),
    ("/edge/v1/pi/status", "bad_topic"),
    ("edge/v1//status", "bad_device_id"),
    ("edge/v1/pi/cmd/status", "unknown_kind"),
    ("edge/v1/pi/ack", "unknown_kind"),
    ("edge/v1/pi/xyz/ack", "bad_topic"),
    ("edge/v1/pi", "bad_topic"),
    ("$share/g/edge/v1/pi/status", "bad_topic"),
    ("edge/v1/pi/cmd/ack/x", "bad_topic"),
    ("edge/v1/" + "x" * 70_000 + "/status", "bad_topic"),
])
def test_bad_topics(topic: str, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_topic(topic)
    assert info.value.reason == reason
    assert decode_or_error(topic, b'{"v":1}').reason == reason  # type: ignore[union-attr]


def test_subscription_filters() -> None:
    assert shared_subscription("ingest", "records") == "$share/ingest/edge/v1/+/records"
    assert fleet_subscription("status") == "edge/v1/+/status"
    assert device_subscription(DEV) == "edge/v1/pi-0042/cmd/+"
    for bad in ("a/b", "+", "#", "", "$x"):
        with pytest.raises(ProtocolError):
            shared_subscription(bad, "records")
    with pytest.raises(ProtocolError, match="unknown_kind"):
        shared_subscription("g", "ack")  # the cloud does not listen to what it sends
    with pytest.raises(ProtocolError, match="unknown_kind"):
        build_topic(DEV, "predictions")


def test_topic_lengths_stay_within_every_broker_limit() -> None:
    # MQTT: at most 65535 UTF-8 bytes; AWS IoT Core: 256 bytes and at most 7 slashes. Longest ids:
    longest = "x" * 64
    topics = [build_topic(longest, k) for k in ALL_KINDS]
    topics += [shared_subscription(longest, k) for k in UP_KINDS] + [device_subscription(longest)]
    for t in topics:
        assert len(t.encode()) <= MAX_TOPIC_BYTES
        assert t.count("/") <= 7
        assert "\x00" not in t
    assert max(len(t) for t in topics) < 100


# ------------------------------------------------------------------------------------------------
# Flags, the documented table and examples, the module's surface


def test_status_last_will_and_flags() -> None:
    will = last_will(DEV, BOOT, time_ms=1764167513000, agent_version="0.1.0")
    assert (will.online, will.models, will.topic) == (False, (), "edge/v1/pi-0042/status")
    assert (Status.QOS, Status.RETAIN) == (1, True)
    assert (Telemetry.QOS, Telemetry.RETAIN) == (0, False)
    assert (RecordBatch.QOS, RecordBatch.RETAIN, Ack.QOS, Ack.RETAIN) == (1, False, 1, False)
    assert (Command.QOS, Command.RETAIN, LabelFeedback.RETAIN) == (1, True, False)
    cmd = Command(DEV, "rollout", "r1", 10, {}, expires_ms=20)
    assert cmd.topic == "edge/v1/pi-0042/cmd/rollout"
    assert not cmd.expired(19)
    assert cmd.expired(20)
    assert not Command(DEV, "config", "c", 10, {}).expired(2**62)
    with pytest.raises(ProtocolError, match="action"):
        Command(DEV, "reboot", "c", 10, {})


def test_messages_are_frozen_and_normalised() -> None:
    m = Status(DEV, True, BOOT, 1, models=[ModelStatus("a", "1", "active")])  # type: ignore[arg-type]
    assert m.models == (ModelStatus("a", "1", "active"),)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.online = False  # type: ignore[misc]
    b = RecordBatch(DEV, BOOT, "x", [[1, "p", 2, {}]])  # type: ignore[arg-type]
    assert b.records == (Record(1, "p", 2, {}),)


def _doc_table() -> dict[str, tuple[str, int, bool, str]]:
    rows = re.findall(r"^\| `edge/v1/<device_id>/([a-z/]+)` \| (up|down) \| (\d) \| (yes|no) \| `(\w+)`",
                      p.__doc__ or "", re.MULTILINE)
    return {topic: (d, int(q), r == "yes", cls) for topic, d, q, r, cls in rows}


def _doc_examples() -> dict[str, bytes]:
    block = (p.__doc__ or "").split("```\n")[1]
    out: dict[str, str] = {}
    current = ""
    for line in block.splitlines():
        if line[:1].strip():
            current, _, rest = line.partition(" ")
            out[current] = rest.strip()
        else:
            out[current] += line.strip()
    return {k: v.encode() for k, v in out.items()}


def test_the_documented_table_matches_the_code() -> None:
    table = _doc_table()
    assert sorted(table) == sorted(k if k in UP_KINDS else f"cmd/{k}" for k in ALL_KINDS)
    for topic, (direction, qos, retain, cls_name) in table.items():
        info = parse_topic(f"edge/v1/{DEV}/{topic}")
        cls = getattr(p, cls_name)
        assert info.direction == direction
        assert (qos, retain) == (cls.QOS, cls.RETAIN), topic


def test_the_documented_examples_decode_and_are_exactly_what_to_wire_writes() -> None:
    examples = _doc_examples()
    assert sorted(examples) == sorted(_doc_table())
    for topic, payload in examples.items():
        m = decode(f"edge/v1/{DEV}/{topic}", payload)
        assert type(m).__name__ == _doc_table()[topic][3]
        assert m.to_wire() == payload, topic
        if isinstance(m, RecordBatch):
            assert DriftSummary.from_record(m.records[2]).summary == {"psi": 0.04}
            assert Event.from_record(m.records[1]).ref == "ro-12"


def test_public_surface() -> None:
    assert all(hasattr(p, name) for name in p.__all__)
    assert sorted(p.RECORD_KIND_CODES.values()) == sorted([p.PREDICTION, p.METRIC, p.DRIFT, p.EVENT, p.SAMPLE])
    assert set(PROTOCOL_ERROR_REASONS) >= {"oversize", "bad_json", "wrong_version", "missing_field", "bad_type"}


def test_importing_the_protocol_loads_only_the_standard_library() -> None:
    code = "import sys, edge_runtime.core.protocol; print(' '.join(sorted(sys.modules)))"
    mods = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True).stdout.split())
    assert not mods & {"numpy", "onnxruntime", "paho", "cv2", "msgpack", "hypothesis"}


@given(st.binary(min_size=1, max_size=64))
def test_any_payload_prefix_of_a_valid_message_is_rejected_cleanly(junk: bytes) -> None:
    wire = EXAMPLES["records"].to_wire()
    assume(junk != wire[: len(junk)])
    decode_or_error(EXAMPLES["records"].topic, wire[: len(wire) // 2] + junk)


def test_status_tags_are_validated_sorted_and_left_out_when_empty() -> None:
    st = p.Status(DEV, True, "b1", 1, "0.1.0", (), ("site:lab", "hw:pi5", "site:lab"))
    assert st.tags == ("hw:pi5", "site:lab")
    back = decode(st.topic, st.to_wire())
    assert isinstance(back, p.Status) and back.tags == ("hw:pi5", "site:lab")
    assert b"tags" not in p.Status(DEV, True, "b1", 1).to_wire()
    for bad in (["a b"], ["$sys"], [7], ["x"] * (p.MAX_TAGS + 1), "site:lab"):
        with pytest.raises(ProtocolError):
            p.Status(DEV, True, "b1", 1, "", (), bad)  # type: ignore[arg-type]


def test_status_connection_numbers_round_trip_and_stay_out_when_zero() -> None:
    will = p.last_will(DEV, "b1", time_ms=5, conn=3)
    back = decode(will.topic, will.to_wire())
    assert isinstance(back, p.Status) and (back.online, back.conn) == (False, 3)
    assert b"conn" not in p.last_will(DEV, "b1", time_ms=5).to_wire()
    with pytest.raises(ProtocolError):
        p.Status(DEV, True, "b1", 1, conn=-1)
