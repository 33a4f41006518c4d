"""The device <-> cloud sync protocol: topics, messages and their wire codec, with no I/O.

Bytes and a topic go in, validated frozen messages come out, and back (h11's shape): the MQTT adapter
owns the client and the clock, so this module is testable without a broker. Anything that arrives is
checked before it is trusted (size cap, schema version, required fields, types, ranges); every
failure is a :class:`ProtocolError` whose ``reason`` is a short code to count by and whose ``detail``
says what was expected and what arrived. Nothing else is raised for any input, so one bad message
never takes an agent or an ingest worker down.

Durability lives outside MQTT (see DESIGN.md): the device keeps every record in its SQLite buffer
until the cloud says, on ``cmd/ack``, that it *committed* the record's key ``(boot_id, seq)``; a
broker PUBACK proves nothing. The cloud dedupes on that key, so resends are harmless. All durable
data (predictions, metric snapshots, drift summaries, events) therefore travels as records of one
:class:`RecordBatch` stream on ``records``: one key space, one dedupe table, one in-flight window,
and ack ranges stay contiguous. ``telemetry`` is the live, lossy view for dashboards.

Topics (``<device_id>``: 1-64 of ``A-Z a-z 0-9 _ . -``, starting with a letter or digit; every
payload is compact JSON with ``"v": 1``; the default size cap is 256 KiB):

| topic | dir | QoS | retained | message |
|---|---|---|---|---|
| `edge/v1/<device_id>/status` | up | 1 | yes | `Status`, also the Last Will (`"online":false`) |
| `edge/v1/<device_id>/telemetry` | up | 0 | no | `Telemetry`: live metrics snapshot |
| `edge/v1/<device_id>/records` | up | 1 | no | `RecordBatch`: predictions, metrics, drift, events |
| `edge/v1/<device_id>/escalate` | up | 0 | no | `Escalation`: an unsure input for the cloud model |
| `edge/v1/<device_id>/cmd/ack` | down | 1 | no | `Ack`: keys the cloud committed |
| `edge/v1/<device_id>/cmd/labels` | down | 1 | no | `LabelFeedback` |
| `edge/v1/<device_id>/cmd/rollout` | down | 1 | yes | `Command` (action `rollout`) |
| `edge/v1/<device_id>/cmd/config` | down | 1 | yes | `Command` (action `config`) |
| `edge/v1/<device_id>/cmd/answer` | down | 0 | no | `EscalationAnswer`: the cloud model's answer |
| `edge/v1/bundles/<bundle_id>/manifest` | down | 1 | yes | `BundleManifest`: one bundle file, for every device |
| `edge/v1/bundles/<bundle_id>/c/<index>` | down | 1 | yes | raw bytes (not JSON): chunk `<index>` of that file |

Payload examples, one per topic (compact JSON, wrapped here; a test decodes each and checks that
``to_wire()`` gives back exactly these bytes):

```
status      {"v":1,"online":true,"boot_id":"b7f3c2a1","time_ms":1764167513000,"agent_version":"0.1.0",
             "models":[{"name":"digits_mlp","version":"3","state":"active"}]}
telemetry   {"v":1,"boot_id":"b7f3c2a1","time_ms":1764167573000,"metrics":{"cpu_percent":41.5,"rss_mb":82.2}}
records     {"v":1,"batch_id":"b7f3c2a1:17-19","boot_id":"b7f3c2a1","records":[
             [17,"p",1764167513120,{"m":"digits_mlp","y":7,"p":0.93}],
             [18,"e",1764167513200,{"name":"model_swapped","severity":"info","ref":"ro-12"}],
             [19,"d",1764167514000,{"model":"digits_mlp","model_version":"3","start_ms":1764167454000,
             "end_ms":1764167514000,"summary":{"psi":0.04}}]]}
cmd/ack     {"v":1,"batch_id":"b7f3c2a1:17-19","acked":[{"boot_id":"b7f3c2a1","ranges":[[17,19]]}]}
cmd/labels  {"v":1,"feedback_id":"fb-88","labels":[[["b7f3c2a1",17],7],["img-0042","cat"]]}
cmd/rollout {"v":1,"command_id":"ro-12","issued_ms":1764167600000,"expires_ms":null,
             "params":{"bundle":"digits_mlp-4","stage":"shadow"}}
cmd/config  {"v":1,"command_id":"cfg-3","issued_ms":1764167600000,"expires_ms":null,"params":{"status_interval_s":60}}
escalate    {"v":1,"id":"b7f3c2a1-42","model":"digits_small","version":"2","local_label":3,"local_score":0.41,
             "reasons":["low_score"],"sent_ms":1764167513120,"data":"RVIwMQAAAAAAAAAA"}
cmd/answer  {"v":1,"id":"b7f3c2a1-42","model":"digits_small","label":5,"score":0.97,"cloud_model":"digits_cloud",
             "sent_ms":1764167513120,"answered_ms":1764167513161}
```

Records are arrays ``[seq, kind, created_ms, payload]`` (no per-record keys: about 30 bytes of
framing per record); ``kind`` is ``"p"`` prediction (``{"m": model, "y": label, "p": score}``, free
form), ``"m"`` metric snapshot (free form), ``"d"`` drift (:class:`DriftSummary`), ``"e"`` event
(:class:`Event`), ``"s"`` sample (an input kept for human review: the prediction's fields, ``reason``
and, only when the device is configured to, the input itself); other short lower-case kinds pass
through so that newer agents are not rejected.

Why these flags:

- ``status`` is retained so that a cloud worker that starts later sees every device's last state;
  the Last Will is ``Status(online=False)`` on the same topic (its ``time_ms`` is when it was
  registered, at connect). Under MQTT 5 a new *shared* subscription gets no retained
  messages (brokers differ; none can be relied on), so the cloud watches status with a plain ``edge/v1/+/status`` filter
  (:func:`fleet_subscription`) and splits ``records`` over ingest workers with
  ``$share/<group>/edge/v1/+/records`` (:func:`shared_subscription`).
- ``telemetry`` is QoS 0: a lost snapshot is replaced by the next one; durable metrics are records.
- ``records`` are QoS 1 so that the hop to the broker retries by itself, but what makes them safe
  is the end-to-end ``Ack``, sent by the cloud after its commit. ``Ack.rejected`` tells the device that the cloud
  will never accept a batch (it failed validation), so that one bad batch cannot block the buffer.
- ``cmd/rollout`` and ``cmd/config`` are retained desired state: a device that was offline gets
  the latest command on reconnect, so it must apply commands idempotently by ``command_id`` and
  ignore expired ones (:meth:`Command.expired`). An empty retained publish clears one; devices see
  it as ``ProtocolError("empty")``. Devices answer commands and label feedback with an
  :class:`Event` record whose ``ref`` is the command or feedback id.
- ``escalate`` and ``cmd/answer`` are QoS 0 and not buffered: an answer is only worth something
  within the device's deadline (seconds); when either is lost, the device's own answer stands.
  ``data`` is the input as the device's privacy setting allows (``core.escalation`` encodes it).
- The device id is taken from the topic only, never from the payload: broker ACLs bind topics to
  client identities (Mosquitto ``%c``/``%u`` patterns), payload fields are not checked by anyone.

Model bundles travel on their own, fleet-wide topics (:class:`BundleManifest`): the cloud publishes
the file's chunks, then the manifest, all retained, so a device that subscribes later (offline, or
rebooted mid-download) still finds everything; an empty retained publish on each topic withdraws a
bundle. ``<bundle_id>`` follows the device id rules, except that ``cmd`` is refused so that no bundle
topic can equal a device's ``cmd/`` topic. A device asks for a few chunk topics at a time (exact
topics, never ``c/+``): a broker queues retained messages for a subscriber like any other, and
Mosquitto drops what exceeds ``max_queued_messages`` (1000 by default) without telling anyone.
Each chunk is ``chunk_size`` bytes (the last one the remainder) and must match its sha256 in
``chunks``; the whole file must match ``sha256`` (abridged here):

```
manifest    {"v":1,"bundle_id":"cnn-3-5f1c0a9e7b2d","name":"cnn","version":"3","size":4300000,
             "sha256":"5f1c0a9e7b2d...","chunk_size":65536,"chunks":["9a41...","03be...",...]}
```

Schema evolution: a receiver ignores keys it does not know, so fields can be added within ``v: 1``;
removing or changing the meaning of a field needs ``v: 2`` (and a new ``edge/v2`` prefix).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, NamedTuple, TypeAlias

from edge_runtime.errors import EdgeRuntimeError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DOWN_KINDS",
    "DRIFT",
    "EVENT",
    "MAX_OBJECT_BYTES",
    "MAX_TOPIC_BYTES",
    "METRIC",
    "PREDICTION",
    "PROTOCOL_ERROR_REASONS",
    "RECORD_KIND_CODES",
    "SAMPLE",
    "SEVERITIES",
    "TOPIC_PREFIX",
    "UP_KINDS",
    "VERSION",
    "Ack",
    "BootRanges",
    "Command",
    "DriftSummary",
    "Escalation",
    "EscalationAnswer",
    "Event",
    "Label",
    "LabelFeedback",
    "Message",
    "ModelStatus",
    "PackedBatch",
    "PredictionKey",
    "ProtocolError",
    "Record",
    "RecordBatch",
    "Status",
    "Telemetry",
    "TopicInfo",
    "build_topic",
    "decode",
    "device_subscription",
    "fleet_subscription",
    "last_will",
    "pack_batches",
    "parse_topic",
    "ranges_contain",
    "ranges_count",
    "ranges_to_seqs",
    "seqs_to_ranges",
    "shared_subscription",
    "validate_device_id",
]

VERSION: Final = 1
TOPIC_PREFIX: Final = "edge/v1"
DEFAULT_MAX_BYTES: Final = 256 * 1024
# Opaque JSON objects (drift summary, metrics, command params, event detail) get their own, smaller
# cap so that one of them cannot crowd everything else out of a message.
MAX_OBJECT_BYTES: Final = 64 * 1024
# MQTT allows 65535 bytes; AWS IoT Core allows 256 and 7 slashes. Ours stay far below both.
MAX_TOPIC_BYTES: Final = 256
MAX_ID_LEN: Final = 64
MAX_TEXT_LEN: Final = 128
MAX_MESSAGE_LEN: Final = 1024
MAX_INT: Final = 2**63 - 1  # SQLite's INTEGER, where seqs and times are stored on both sides

UP_KINDS: Final[tuple[str, ...]] = ("status", "telemetry", "records", "escalate")
DOWN_KINDS: Final[tuple[str, ...]] = ("ack", "labels", "rollout", "config", "answer")
MAX_ESCALATION_DATA: Final = 64 * 1024  # an escalated input, encoded (before base64)
COMMAND_ACTIONS: Final[tuple[str, ...]] = ("rollout", "config")

PREDICTION: Final = "p"
METRIC: Final = "m"
DRIFT: Final = "d"
EVENT: Final = "e"
SAMPLE: Final = "s"
_KNOWN_RECORD_KINDS: Final = frozenset((PREDICTION, METRIC, DRIFT, EVENT, SAMPLE))
# The buffer and the cloud's tables may name kinds in full; the wire spends one letter per record.
RECORD_KIND_CODES: Final[Mapping[str, str]] = {"prediction": PREDICTION, "metric": METRIC, "drift": DRIFT,
                                                "event": EVENT, "sample": SAMPLE}

SEVERITIES: Final = ("debug", "info", "warning", "error", "critical")

PROTOCOL_ERROR_REASONS: Final = (
    "bad_topic",       # not an edge/v1 topic, wrong shape, wildcard, too long
    "bad_device_id",   # the device id in a topic (or given to a builder) breaks the id rules
    "unknown_kind",    # a well-formed topic whose last level names no message type
    "oversize",        # payload, record or opaque object over its byte cap
    "empty",           # zero-length payload (how a retained message is cleared)
    "bad_json",        # not UTF-8, not JSON, NaN/Infinity, nested too deeply, 4300+ digit number
    "wrong_version",   # "v" is not 1
    "missing_field",   # a required key is absent
    "bad_type",        # a value has the wrong JSON type (true is not an int, 1.0 is not an int)
    "bad_value",       # right type, wrong value: negative seq, unknown action, unsorted ranges, ...
)

# Device, boot, command and feedback ids, shared-subscription groups: safe in topics, file names and
# logs, and never an MQTT wildcard, level separator or "$" topic.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Batch ids are "<boot_id>:<first_seq>-<last_seq>" when made by pack_batches.
_BATCH_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,159}")
_KIND_RE = re.compile(r"[a-z][a-z0-9_]{0,15}")
_TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:=/-]{0,63}")  # device tags: site:lab, hw:pi5, zone=eu
MAX_TAGS: Final = 32
_EVENT_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,47}")  # event names: frame_uniform_cleared, rollout_rolled_back


class ProtocolError(EdgeRuntimeError):
    """A message, record, topic or value breaks the protocol; the receiver counts it by ``reason``.

    ``reason`` is one of :data:`PROTOCOL_ERROR_REASONS`; ``detail`` names the field, what was
    expected and what arrived. ``topic``, ``batch_id`` and ``seq`` are filled in where known, so that
    the cloud can reject a bad batch by id and the device can set a bad record aside by seq.
    """

    def __init__(self, reason: str, detail: str = "", *, topic: str | None = None,
                 batch_id: str | None = None, seq: int | None = None) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail
        self.topic = topic
        self.batch_id = batch_id
        self.seq = seq

    def __str__(self) -> str:
        msg = f"{self.reason}: {self.detail}" if self.detail else self.reason
        if self.seq is not None:
            msg += f" [seq {self.seq}]"
        if self.batch_id is not None:
            msg += f" [batch {self.batch_id}]"
        if self.topic is not None:
            msg += f" [topic {_clip(self.topic)}]"
        return msg


# --------------------------------------------------------------------------------------------------
# Value checks. Each names the field, the expected type and the JSON type that arrived.

def _clip(s: str, n: int = 120) -> str:
    return s if len(s) <= n else s[:n] + "..."


def _jtype(v: object) -> str:
    """JSON's name for a decoded value's type (a Python name for anything else)."""
    if v is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "object",
            tuple: "list"}.get(type(v), type(v).__name__)


def _bad_type(name: str, v: object, expected: str) -> ProtocolError:
    return ProtocolError("bad_type", f"{name} is {_jtype(v)}, expected {expected}")


def _int(v: object, name: str, lo: int = 0, hi: int = MAX_INT) -> int:
    # type() rather than isinstance(): JSON true must not pass as 1.
    if type(v) is not int:
        raise _bad_type(name, v, "int")
    if not lo <= v <= hi:
        raise ProtocolError("bad_value", f"{name} is {v}, expected {lo}..{hi}")
    return v


def _opt_int(v: object, name: str) -> int | None:
    return None if v is None else _int(v, name)


def _bool(v: object, name: str) -> bool:
    if type(v) is not bool:
        raise _bad_type(name, v, "bool")
    return v


def _text(v: object, name: str, max_len: int = MAX_TEXT_LEN) -> str:
    if type(v) is not str:
        raise _bad_type(name, v, "str")
    if len(v) > max_len:
        raise ProtocolError("bad_value", f"{name} is {len(v)} characters, expected at most {max_len}")
    return v


def _ident(v: object, name: str, pattern: re.Pattern[str] = _ID_RE) -> str:
    if type(v) is not str:
        raise _bad_type(name, v, "str")
    if pattern.fullmatch(v) is None:
        raise ProtocolError("bad_value", f"{name} {_clip(v, 80)!r} is not an id ({pattern.pattern})")
    return v


def _obj(v: object, name: str, max_bytes: int = MAX_OBJECT_BYTES) -> dict[str, Any]:
    """An opaque JSON object: checked only for being one, finite, and under its byte cap."""
    if type(v) is not dict:
        raise _bad_type(name, v, "object")
    n = len(_encode(v, name))
    if n > max_bytes:
        raise ProtocolError("oversize", f"{name} is {n} bytes > {max_bytes}")
    return v


def _list(v: object, name: str) -> list[Any] | tuple[Any, ...]:
    if type(v) is not list and not isinstance(v, tuple):
        raise _bad_type(name, v, "list")
    return v


def _get(obj: Mapping[str, Any], key: str) -> Any:
    try:
        return obj[key]
    except KeyError:
        raise ProtocolError("missing_field", key) from None


def _as_object(v: object, name: str) -> Mapping[str, Any]:
    if type(v) is not dict:
        raise _bad_type(name, v, "object")
    return v


# --------------------------------------------------------------------------------------------------
# JSON codec. ensure_ascii keeps str length equal to byte length, so pack_batches sizes records
# without encoding them twice; NaN/Infinity are refused both ways (other JSON parsers reject them).

_json_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def _encode(v: object, name: str = "message") -> str:
    try:
        return _json_encode(v)
    except (ValueError, TypeError) as e:  # NaN/Infinity, circular, or a non-JSON type
        raise ProtocolError("bad_value", f"{name} is not JSON: {_clip(str(e))}") from None
    except RecursionError:
        raise ProtocolError("bad_value", f"{name} is nested too deeply") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _finite_float(s: str) -> float:
    f = float(s)
    if not math.isfinite(f):  # 1e999 parses to inf
        raise ValueError(f"number {_clip(s, 40)} is out of range")
    return f


_json_decode = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float).decode


def _load(payload: object, max_bytes: int) -> dict[str, Any]:
    """Size cap, then UTF-8 JSON, then the envelope (an object with ``"v": 1``)."""
    if isinstance(payload, memoryview):
        payload = payload.tobytes()
    if not isinstance(payload, bytes | bytearray):
        raise _bad_type("payload", payload, "bytes")
    n = len(payload)
    if n > max_bytes:
        raise ProtocolError("oversize", f"{n} bytes > {max_bytes}")
    if n == 0:
        raise ProtocolError("empty", "zero-length payload (a cleared retained message)")
    try:
        obj = _json_decode(payload.decode("utf-8"))
    except RecursionError:
        raise ProtocolError("bad_json", "nested too deeply") from None
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ProtocolError("bad_json", _clip(str(e))) from None
    if type(obj) is not dict:
        raise _bad_type("message", obj, "object")
    v = _get(obj, "v")
    if type(v) is not int:
        raise _bad_type("v", v, "int")
    if v != VERSION:
        raise ProtocolError("wrong_version", f"{v}")
    return obj


def _finish(obj: dict[str, Any], max_bytes: int) -> bytes:
    data = _encode(obj).encode("ascii")
    if len(data) > max_bytes:
        raise ProtocolError("oversize", f"{len(data)} bytes > {max_bytes}")
    return data


# --------------------------------------------------------------------------------------------------
# Topics.

class TopicInfo(NamedTuple):
    """A parsed topic: whose it is, which way it flows (``"up"``/``"down"``) and what it carries."""

    device_id: str
    direction: str
    kind: str


def validate_device_id(device_id: object) -> str:
    """Return ``device_id`` if it is safe as one topic level, else raise ``bad_device_id``.

    1-64 characters of ``A-Z a-z 0-9 _ . -``, starting with a letter or digit: no ``/``, ``+``, ``#``
    (which would let one id address or subscribe to another's topics), no leading ``$`` (broker
    topics), no NUL, no spaces, nothing a file name or a log line would need to escape.
    """
    if type(device_id) is not str:
        raise ProtocolError("bad_device_id", f"device id is {_jtype(device_id)}, expected str")
    if _ID_RE.fullmatch(device_id) is None:
        raise ProtocolError("bad_device_id", f"{_clip(device_id, 80)!r}: expected 1-{MAX_ID_LEN} of "
                            "A-Z a-z 0-9 _ . - starting with a letter or digit")
    return device_id


def build_topic(device_id: str, kind: str) -> str:
    """The topic for ``kind`` (one of :data:`UP_KINDS` or :data:`DOWN_KINDS`) of one device."""
    validate_device_id(device_id)
    if kind in UP_KINDS:
        return f"{TOPIC_PREFIX}/{device_id}/{kind}"
    if kind in DOWN_KINDS:
        return f"{TOPIC_PREFIX}/{device_id}/cmd/{kind}"
    raise ProtocolError("unknown_kind", f"{kind!r}, expected one of {UP_KINDS + DOWN_KINDS}")


def parse_topic(topic: object) -> TopicInfo:
    """Split a received topic into (device_id, direction, kind), or raise a ProtocolError."""
    if type(topic) is not str:
        raise ProtocolError("bad_topic", f"topic is {_jtype(topic)}, expected str")
    n = len(topic.encode("utf-8", "surrogatepass"))
    if n > MAX_TOPIC_BYTES:
        raise ProtocolError("bad_topic", f"{n} bytes > {MAX_TOPIC_BYTES}", topic=topic)
    parts = topic.split("/")
    if len(parts) not in (4, 5) or parts[0] != "edge":
        raise ProtocolError("bad_topic", "expected edge/v1/<device_id>/<kind> or edge/v1/<device_id>/cmd/<kind>",
                            topic=topic)
    if parts[1] != "v1":
        raise ProtocolError("bad_topic", f"version {_clip(parts[1], 20)!r} is not supported, expected v1", topic=topic)
    try:
        device_id = validate_device_id(parts[2])
    except ProtocolError as e:
        e.topic = topic
        raise
    if len(parts) == 4:
        direction, kind, kinds = "up", parts[3], UP_KINDS
    elif parts[3] == "cmd":
        direction, kind, kinds = "down", parts[4], DOWN_KINDS
    else:
        raise ProtocolError("bad_topic", f"expected 'cmd' at level 4, got {_clip(parts[3], 40)!r}", topic=topic)
    if kind not in kinds:
        raise ProtocolError("unknown_kind", f"{_clip(kind, 40)!r} is not a {direction} kind {kinds}", topic=topic)
    return TopicInfo(device_id, direction, kind)


def shared_subscription(group: str, kind: str) -> str:
    """``$share/<group>/edge/v1/+/<kind>``: the ingest workers of one group split the fleet's messages.

    MQTT 5 sends no retained messages to shared subscriptions, so watch ``status`` with
    :func:`fleet_subscription` instead.
    """
    _ident(group, "group")
    if kind not in UP_KINDS:
        raise ProtocolError("unknown_kind", f"{kind!r}, expected one of {UP_KINDS}")
    return f"$share/{group}/{TOPIC_PREFIX}/+/{kind}"


def fleet_subscription(kind: str) -> str:
    """``edge/v1/+/<kind>``: every device's ``kind`` on one, non-shared, subscription."""
    if kind not in UP_KINDS:
        raise ProtocolError("unknown_kind", f"{kind!r}, expected one of {UP_KINDS}")
    return f"{TOPIC_PREFIX}/+/{kind}"


def device_subscription(device_id: str) -> str:
    """``edge/v1/<device_id>/cmd/+``: everything the cloud sends one device."""
    return f"{TOPIC_PREFIX}/{validate_device_id(device_id)}/cmd/+"


# --------------------------------------------------------------------------------------------------
# Sequence ranges: how acks name many keys in few bytes, and how the buffer deletes them.

def seqs_to_ranges(seqs: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """Sorted, merged, inclusive ``(first, last)`` ranges covering exactly the given seqs."""
    out: list[tuple[int, int]] = []
    it = iter(sorted(set(seqs)))
    for start in it:
        first = last = start
        for s in it:
            if s != last + 1:
                out.append((first, last))
                first = s
            last = s
        out.append((first, last))
    return tuple(out)


def _check_ranges(ranges: object, name: str) -> tuple[tuple[int, int], ...]:
    """Canonical form only (sorted, disjoint, not touching), so that equal key sets compare equal."""
    out: list[tuple[int, int]] = []
    prev = -2
    for i, raw in enumerate(_list(ranges, name)):
        item = f"{name}[{i}]"
        r = _list(raw, item)
        if len(r) != 2:
            raise ProtocolError("bad_value", f"{item} has {len(r)} items, expected [first, last]")
        a = _int(r[0], f"{item}[0]")
        b = _int(r[1], f"{item}[1]")
        if b < a:
            raise ProtocolError("bad_value", f"{item} is [{a}, {b}]: last < first")
        if a <= prev + 1:
            raise ProtocolError("bad_value", f"{item} starts at {a}, not after the previous range's end + 1 ({prev})")
        prev = b
        out.append((a, b))
    return tuple(out)


def ranges_count(ranges: Iterable[tuple[int, int]]) -> int:
    """How many seqs the ranges cover."""
    return sum(b - a + 1 for a, b in ranges)


def ranges_to_seqs(ranges: Iterable[tuple[int, int]], *, limit: int = 1 << 20) -> list[int]:
    """Every seq in the ranges, in order. ``limit`` guards against expanding ``[[0, 2**62]]``: delete
    by range (``seq BETWEEN a AND b``) instead of expanding acks from the network."""
    rs = list(ranges)
    n = ranges_count(rs)
    if n > limit:
        raise ProtocolError("bad_value", f"ranges cover {n} seqs > limit {limit}")
    return [s for a, b in rs for s in range(a, b + 1)]


def ranges_contain(ranges: Sequence[tuple[int, int]], seq: int) -> bool:
    """Whether canonical (sorted) ranges cover ``seq``; O(log n)."""
    i = bisect_right(ranges, (seq, MAX_INT + 1)) - 1
    return i >= 0 and ranges[i][0] <= seq <= ranges[i][1]


# --------------------------------------------------------------------------------------------------
# Messages. Each is a frozen dataclass validated when built (locally or from the wire, same checks),
# with ``topic``, ``QOS``, ``RETAIN`` and ``to_wire()`` for the transport.

class _Message:
    __slots__ = ()
    KIND: ClassVar[str]
    QOS: ClassVar[int]
    RETAIN: ClassVar[bool]
    device_id: str

    @property
    def kind(self) -> str:
        """The topic's last level."""
        return self.KIND

    @property
    def topic(self) -> str:
        return build_topic(self.device_id, self.kind)

    def to_wire(self, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
        """Compact JSON; refuses to produce what a receiver with the same cap would reject."""
        return _finish({"v": VERSION, **self._to_obj()}, max_bytes)

    def _to_obj(self) -> dict[str, Any]:
        raise NotImplementedError


def _set(obj: object, name: str, value: object) -> None:
    # Normalising a field (list -> tuple) inside a frozen dataclass's __post_init__.
    object.__setattr__(obj, name, value)


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """One model the agent hosts: ``state`` is its rollout state (``active``, ``shadow``, ...)."""

    name: str
    version: str
    state: str

    def __post_init__(self) -> None:
        _text(self.name, "name")
        _text(self.version, "version")
        _text(self.state, "state")

    @classmethod
    def _from_obj(cls, v: object, name: str) -> ModelStatus:
        o = _as_object(v, name)
        try:
            return cls(_get(o, "name"), _get(o, "version"), _get(o, "state"))
        except ProtocolError as e:
            e.detail = f"{name}.{e.detail}"  # which model of the list
            raise


@dataclass(frozen=True, slots=True)
class Status(_Message):
    """Retained presence and state of one agent; ``online=False`` is also its Last Will."""

    KIND: ClassVar[str] = "status"
    QOS: ClassVar[int] = 1
    RETAIN: ClassVar[bool] = True

    device_id: str
    online: bool
    boot_id: str
    time_ms: int
    agent_version: str = ""
    models: tuple[ModelStatus, ...] = ()
    tags: tuple[str, ...] = ()  # the device's labels for rollout targeting ("site:lab", "hw:pi5"); sorted
    conn: int = 0  # the connection's number within the boot (1, 2, ...): tells a late Last Will from a live one

    def __post_init__(self) -> None:
        validate_device_id(self.device_id)
        _bool(self.online, "online")
        _ident(self.boot_id, "boot_id")
        _int(self.time_ms, "time_ms")
        _text(self.agent_version, "agent_version")
        models = tuple(_list(self.models, "models"))
        for i, m in enumerate(models):
            if not isinstance(m, ModelStatus):
                raise _bad_type(f"models[{i}]", m, "ModelStatus")
        _set(self, "models", models)
        tags = tuple(_list(self.tags, "tags"))
        if len(tags) > MAX_TAGS:
            raise ProtocolError("bad_value", f"{len(tags)} tags, at most {MAX_TAGS}")
        _set(self, "tags", tuple(sorted({_ident(t, f"tags[{i}]", _TAG_RE) for i, t in enumerate(tags)})))
        _int(self.conn, "conn")

    def _to_obj(self) -> dict[str, Any]:
        out = {"online": self.online, "boot_id": self.boot_id, "time_ms": self.time_ms,
               "agent_version": self.agent_version,
               "models": [{"name": m.name, "version": m.version, "state": m.state} for m in self.models]}
        if self.tags:
            out["tags"] = list(self.tags)
        if self.conn:
            out["conn"] = self.conn
        return out

    @classmethod
    def _from_obj(cls, device_id: str, o: dict[str, Any]) -> Status:
        models = _list(o.get("models", []), "models")
        return cls(device_id, _get(o, "online"), _get(o, "boot_id"), _get(o, "time_ms"),
                   o.get("agent_version", ""),
                   tuple(ModelStatus._from_obj(m, f"models[{i}]") for i, m in enumerate(models)),
                   tuple(_list(o.get("tags", []), "tags")), o.get("conn", 0))


def last_will(device_id: str, boot_id: str, *, time_ms: int, agent_version: str = "", conn: int = 0) -> Status:
    """The offline Status to register as Last Will at connect (and to publish on a clean shutdown).

    The broker publishes the will later, so its ``time_ms`` is the registration time: the cloud should
    date "went offline" by when it received the will, not by this field. ``conn`` numbers the connection
    within the boot: a will of connection 1 that the broker delivers after the device's online status
    of connection 2 (a quick reconnect) is stale, and the cloud ignores it.
    """
    return Status(device_id, False, boot_id, time_ms, agent_version, (), (), conn)


@dataclass(frozen=True, slots=True)
class Telemetry(_Message):
    """A live metrics snapshot for dashboards (QoS 0, lossy); ``metrics`` is an opaque JSON object."""

    KIND: ClassVar[str] = "telemetry"
    QOS: ClassVar[int] = 0
    RETAIN: ClassVar[bool] = False

    device_id: str
    boot_id: str
    time_ms: int
    metrics: dict[str, Any]

    def __post_init__(self) -> None:
        validate_device_id(self.device_id)
        _ident(self.boot_id, "boot_id")
        _int(self.time_ms, "time_ms")
        _obj(self.metrics, "metrics")

    def _to_obj(self) -> dict[str, Any]:
        return {"boot_id": self.boot_id, "time_ms": self.time_ms, "metrics": self.metrics}

    @classmethod
    def _from_obj(cls, device_id: str, o: dict[str, Any]) -> Telemetry:
        return cls(device_id, _get(o, "boot_id"), _get(o, "time_ms"), _get(o, "metrics"))


class Record(NamedTuple):
    """One buffered item, keyed by ``(boot_id, seq)`` of its batch. A tuple rather than a dataclass:
    batches hold hundreds, it is built per decoded record, and it encodes as the wire array as is."""

    seq: int
    kind: str
    created_ms: int
    payload: dict[str, Any]


def _check_record(r: object, i: int) -> Record:
    """Validate one record (the hot loop of decode and pack_batches: keep it flat)."""
    if type(r) is not Record:
        if not isinstance(r, tuple | list):
            raise _bad_type(f"records[{i}]", r, "[seq, kind, created_ms, payload]")
        if len(r) != 4:
            raise ProtocolError("bad_value", f"records[{i}] has {len(r)} items, expected [seq, kind, created_ms, "
                                "payload]")
        r = Record(*r)
    seq, kind, created, payload = r
    if type(seq) is not int or not 0 <= seq <= MAX_INT:
        _int(seq, f"records[{i}].seq")
    if type(kind) is not str or kind not in _KNOWN_RECORD_KINDS:  # a list here is unhashable
        try:
            _ident(kind, f"records[{i}].kind", _KIND_RE)
        except ProtocolError as e:
            e.seq = seq
            raise
    if type(created) is not int or not 0 <= created <= MAX_INT:
        try:
            _int(created, f"records[{i}].created_ms")
        except ProtocolError as e:
            e.seq = seq
            raise
    if type(payload) is not dict:
        err = _bad_type(f"records[{i}].payload", payload, "object")
        err.seq = seq
        raise err
    return r


@dataclass(frozen=True, slots=True)
class RecordBatch(_Message):
    """Many records of one boot in one message; the cloud commits them, then acks ``batch_id``.

    ``records`` keeps the order it was given; seqs need not be contiguous (priorities, deletions).
    Build batches for the wire with :func:`pack_batches`, which also keeps them under the size cap.
    """

    KIND: ClassVar[str] = "records"
    QOS: ClassVar[int] = 1
    RETAIN: ClassVar[bool] = False

    device_id: str
    boot_id: str
    batch_id: str
    records: tuple[Record, ...]

    def __post_init__(self) -> None:
        validate_device_id(self.device_id)
        _ident(self.boot_id, "boot_id")
        _ident(self.batch_id, "batch_id", _BATCH_ID_RE)
        records = _list(self.records, "records")
        if not records:
            raise ProtocolError("bad_value", "records is empty")
        _set(self, "records", tuple([_check_record(r, i) for i, r in enumerate(records)]))

    @property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        """The keys this batch carries, as an Ack would name them."""
        return seqs_to_ranges(r.seq for r in self.records)

    def _to_obj(self) -> dict[str, Any]:
        # Records encode as arrays (Record is a tuple): the same bytes pack_batches writes.
        return {"batch_id": self.batch_id, "boot_id": self.boot_id, "records": self.records}

    @classmethod
    def _from_obj(cls, device_id: str, o: dict[str, Any]) -> RecordBatch:
        bid = o.get("batch_id")
        try:
            return cls(device_id, _get(o, "boot_id"), _get(o, "batch_id"), _get(o, "records"))
        except ProtocolError as e:
            # Tell the cloud which batch to reject, so the device stops resending it.
            if type(bid) is str and _BATCH_ID_RE.fullmatch(bid):
                e.batch_id = bid
            raise


class PackedBatch(NamedTuple):
    """One encoded RecordBatch ready to publish, with what the sync needs to track it in flight:
    ``records[start:stop]`` went into it, and ``ranges`` are the keys its Ack will name."""

    batch_id: str
    boot_id: str
    topic: str
    payload: bytes
    start: int
    stop: int
    ranges: tuple[tuple[int, int], ...]


def pack_batches(records: Sequence[Record | tuple[int, str, int, dict[str, Any]]],
                 max_bytes: int = DEFAULT_MAX_BYTES, *, device_id: str, boot_id: str,
                 max_records: int | None = None) -> list[PackedBatch]:
    """Split one boot's records, in order, into as few RecordBatch messages as fit ``max_bytes`` each.

    Greedy and single pass: each record is validated and encoded once, and a batch is closed when the
    next record would not fit (or ``max_records`` is reached). ``batch_id`` is
    ``"<boot_id>:<first_seq>-<last_seq>"``, so re-packing the same records gives the same ids.
    A record that is invalid or cannot fit even alone raises a ProtocolError carrying its ``seq``: the
    caller sets it aside (it would block the buffer forever) and packs the rest again.
    """
    topic = build_topic(device_id, RecordBatch.KIND)
    _ident(boot_id, "boot_id")
    if max_records is not None and max_records < 1:
        raise ProtocolError("bad_value", f"max_records is {max_records}, expected >= 1")
    boot_json = _encode(boot_id)
    # The batch id is not known until the batch closes; reserve room for the longest one possible.
    longest_id = len(_encode(f"{boot_id}:{MAX_INT}-{MAX_INT}"))
    fixed = len('{"v":1,"batch_id":,"boot_id":,"records":[]}') + longest_id + len(boot_json)
    cap = len(records) if max_records is None else max_records

    parts: list[str] = []
    for i, r in enumerate(records):
        rec = _check_record(r, i)
        try:
            parts.append(_json_encode(rec))
        except (ValueError, TypeError, RecursionError) as e:
            raise ProtocolError("bad_value", f"records[{i}].payload is not JSON: {_clip(str(e))}",
                                seq=rec.seq) from None

    out: list[PackedBatch] = []
    n = len(parts)
    i = 0
    while i < n:
        size = fixed + len(parts[i])
        if size > max_bytes:
            raise ProtocolError("oversize", f"record is {len(parts[i])} bytes, a {max_bytes}-byte message holds at "
                                f"most {max(0, max_bytes - fixed)}", seq=records[i][0])
        j = i + 1
        stop = min(n, i + cap)
        while j < stop:
            size += len(parts[j]) + 1
            if size > max_bytes:
                break
            j += 1
        seqs = [records[k][0] for k in range(i, j)]
        batch_id = f"{boot_id}:{seqs[0]}-{seqs[-1]}"
        payload = (f'{{"v":{VERSION},"batch_id":{_encode(batch_id)},"boot_id":{boot_json},"records":['
                   + ",".join(parts[i:j]) + "]}").encode("ascii")
        out.append(PackedBatch(batch_id, boot_id, topic, payload, i, j, seqs_to_ranges(seqs)))
        i = j
    return out


class BootRanges(NamedTuple):
    """Acknowledged seqs of one boot, as canonical inclusive ranges."""

    boot_id: str
    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class Ack(_Message):
    """The cloud has committed these keys: the device may delete them from its buffer.

    Sent only after the cloud's store commit, never on receipt. ``acked`` may cover more than batch
    ``batch_id`` (cumulative acks, several boots). ``rejected`` (a ProtocolError reason) means the cloud
    will never accept batch ``batch_id``: the device counts it, drops its records and moves on.
    """

    KIND: ClassVar[str] = "ack"
    QOS: ClassVar[int] = 1
    RETAIN: ClassVar[bool] = False

    device_id: str
    batch_id: str
    acked: tuple[BootRanges, ...]
    rejected: str = ""

    def __post_init__(self) -> None:
        validate_device_id(self.device_id)
        _ident(self.batch_id, "batch_id", _BATCH_ID_RE)
        acked: list[BootRanges] = []
        seen: set[str] = set()
        for i, br in enumerate(_list(self.acked, "acked")):
            if not isinstance(br, tuple) or len(br) != 2:
                raise _bad_type(f"acked[{i}]", br, "BootRanges")
            boot = _ident(br[0], f"acked[{i}].boot_id")
            if boot in seen:
                raise ProtocolError("bad_value", f"acked[{i}].boot_id {boot!r} appears twice")
            seen.add(boot)
            acked.append(BootRanges(boot, _check_ranges(br[1], f"acked[{i}].ranges")))
        _set(self, "acked", tuple(acked))
        if self.rejected:
            _ident(self.rejected, "rejected", _KIND_RE)
        else:
            _text(self.rejected, "rejected")

    def _to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"batch_id": self.batch_id,
                               "acked": [{"boot_id": b, "ranges": r} for b, r in self.acked]}
        if self.rejected:
            obj["rejected"] = self.rejected
        return obj

    @classmethod
    def _from_obj(cls, device_id: str, o: dict[str, Any]) -> Ack:
        acked = []
        for i, item in enumerate(_list(_get(o, "acked"), "acked")):
            d = _as_object(item, f"acked[{i}]")
            acked.append(BootRanges(_get(d, "boot_id"), _get(d, "ranges")))
        return cls(device_id, _get(o, "batch_id"), tuple(acked), o.get("rejected", ""))


class PredictionKey(NamedTuple):
    """Names one prediction record: the key the device buffered it under."""

    boot_id: str
    seq: int


class Label(NamedTuple):
    """Ground truth for one prediction (by key) or one input (by the source's input id)."""

    ref: PredictionKey | str
    label: int | float | str


def _label_value(v: object, name: str) -> int | float | str:
    if type(v) is float:
        if not math.isfinite(v):
            raise ProtocolError("bad_value", f"{name} is {v}")
    elif type(v) is str:
        _text(v, name)
    elif type(v) is not int:
        raise _bad_type(name, v, "int, float or str")
    return v  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class LabelFeedback(_Message):
    """Labels the cloud learned (from people or downstream systems), for on-device accuracy.

    The device answers with an Event record whose ``ref`` is ``feedback_id`` once it applied them.
    """

    KIND: ClassVar[str] = "labels"
    QOS: ClassVar[int] = 1
    RETAIN: ClassVar[bool] = False

    device_id: str
    feedback_id: str
    labels: tuple[Label, ...]

    def __post_init__(self) -> None:
        validate_device_id(self.device_id)
        _ident(self.feedback_id, "feedback_id")
        labels: list[Label] = []
        for i, raw in enumerate(_list(self.labels, "labels")):
            name = f"labels[{i}]"
            item = _list(raw, name)
            if len(item) != 2:
                raise ProtocolError("bad_value", f"{name} has {len(item)} items, expected [ref, label]")
            ref, value = item
            if type(ref) is str:
                # An input id is the source's own name for an input (a file path, a frame number).
                if not _text(ref, f"{name}.ref"):
                    raise ProtocolError("bad_value", f"{name}.ref is empty")
            else:
                ref = _list(ref, f"{name}.ref")
                if len(ref) != 2:
                    raise ProtocolError("bad_value", f"{name}.ref has {len(ref)} items, expected [boot_id, seq] "
                                        "or an input id")
                ref = PredictionKey(_ident(ref[0], f"{name}.ref.boot_id"), _int(ref[1], f"{name}.ref.seq"))
            labels.append(Label(ref, _label_value(value, f"{name}.label")))
        _set(self, "labels", tuple(labels))

    def _to_obj(self) -> dict[str, Any]:
        return {"feedback_id": self.feedback_id, "labels": self.labels}

    @classmethod
    def _from_obj(cls, device_id: str, o: dict[str, Any]) -> LabelFeedback:
        return cls(device_id, _get(o, "feedback_id"), _get(o, "labels"))


@dataclass(frozen=True, slots=True)
class Command(_Message):
    """A rollout or config order: retained desired state, applied once per ``command_id``.

    ``params`` is opaque here (the rollout planner and config define it). ``expires_ms`` lets a device
    that was offline for long ignore an order that is no longer meant.
    """

    QOS: ClassVar[int] = 1
    RETAIN: ClassVar[bool] = True

    device_id: str
    action: str
    command_id: str
    issued_ms: int
    params: dict[str, Any]
    expires_ms: int | None = None

    def __post_init__(self) -> None:
        validate_device_id(self.device_id)
        if self.action not in COMMAND_ACTIONS:
            raise ProtocolError("bad_value", f"action is {_clip(repr(self.action), 40)}, expected one of "
                                f"{COMMAND_ACTIONS}")
        _ident(self.command_id, "command_id")
        _int(self.issued_ms, "issued_ms")
        _obj(self.params, "params")
        _opt_int(self.expires_ms, "expires_ms")

    @property
    def kind(self) -> str:
        return self.action

    def expired(self, now_ms: int) -> bool:
        return self.expires_ms is not None and now_ms >= self.expires_ms

    def _to_obj(self) -> dict[str, Any]:
        return {"command_id": self.command_id, "issued_ms": self.issued_ms, "expires_ms": self.expires_ms,
                "params": self.params}

    @classmethod
    def _from_obj_for(cls, action: str) -> Callable[[str, dict[str, Any]], Command]:
        def from_obj(device_id: str, o: dict[str, Any]) -> Command:
            return cls(device_id, action, _get(o, "command_id"), _get(o, "issued_ms"), _get(o, "params"),
                       o.get("expires_ms"))
        return from_obj


def _opt_score(v: object, name: str) -> float | None:
    if v is None:
        return None
    if type(v) not in (int, float) or not math.isfinite(v):  # type: ignore[arg-type]
        raise _bad_type(name, v, "a finite number or null")
    return float(v)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Escalation(_Message):
    """An input the device's model was unsure of, for a larger model in the cloud: the input as the
    device's privacy setting allows (``data``: bytes from ``core.escalation.encode_payload``, base64 on
    the wire), with the answer the device already gave. QoS 0 and not buffered: an answer after the
    deadline is worth nothing, and the local answer stands."""

    KIND: ClassVar[str] = "escalate"
    QOS: ClassVar[int] = 0
    RETAIN: ClassVar[bool] = False

    device_id: str
    id: str                 # the prediction's id: the answer names it
    model: str
    version: str
    local_label: int | float | str
    local_score: float | None
    reasons: tuple[str, ...]
    data: bytes
    sent_ms: int

    def __post_init__(self) -> None:
        validate_device_id(self.device_id)
        if not _text(self.id, "id"):
            raise ProtocolError("bad_value", "id is empty")
        _ident(self.model, "model")
        _text(self.version, "version")
        _label_value(self.local_label, "local_label")
        _set(self, "local_score", _opt_score(self.local_score, "local_score"))
        _set(self, "reasons", tuple(_text(r, "reasons[]", 32) for r in _list(self.reasons, "reasons")))
        if type(self.data) is not bytes:
            raise _bad_type("data", self.data, "bytes")
        if not 0 < len(self.data) <= MAX_ESCALATION_DATA:
            raise ProtocolError("oversize" if self.data else "bad_value",
                                f"data is {len(self.data)} bytes, expected 1-{MAX_ESCALATION_DATA}")
        _int(self.sent_ms, "sent_ms")

    def _to_obj(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.model, "version": self.version, "local_label": self.local_label,
                "local_score": self.local_score, "reasons": self.reasons, "sent_ms": self.sent_ms,
                "data": base64.b64encode(self.data).decode("ascii")}

    @classmethod
    def _from_obj(cls, device_id: str, o: dict[str, Any]) -> Escalation:
        raw = _text(_get(o, "data"), "data", 4 * MAX_ESCALATION_DATA // 3 + 4)
        try:
            data = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ProtocolError("bad_value", f"data is not base64: {e}") from None
        return cls(device_id, _get(o, "id"), _get(o, "model"), _get(o, "version"), _get(o, "local_label"),
                   o.get("local_score"), _get(o, "reasons"), data, _get(o, "sent_ms"))


@dataclass(frozen=True, slots=True)
class EscalationAnswer(_Message):
    """The cloud model's answer to one :class:`Escalation` (``id`` names it; ``sent_ms`` is echoed)."""

    KIND: ClassVar[str] = "answer"
    QOS: ClassVar[int] = 0
    RETAIN: ClassVar[bool] = False

    device_id: str
    id: str
    model: str
    label: int | float | str
    score: float | None
    cloud_model: str
    sent_ms: int
    answered_ms: int

    def __post_init__(self) -> None:
        validate_device_id(self.device_id)
        if not _text(self.id, "id"):
            raise ProtocolError("bad_value", "id is empty")
        _ident(self.model, "model")
        _label_value(self.label, "label")
        _set(self, "score", _opt_score(self.score, "score"))
        _text(self.cloud_model, "cloud_model")
        _int(self.sent_ms, "sent_ms")
        _int(self.answered_ms, "answered_ms")

    def _to_obj(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.model, "label": self.label, "score": self.score,
                "cloud_model": self.cloud_model, "sent_ms": self.sent_ms, "answered_ms": self.answered_ms}

    @classmethod
    def _from_obj(cls, device_id: str, o: dict[str, Any]) -> EscalationAnswer:
        return cls(device_id, _get(o, "id"), _get(o, "model"), _get(o, "label"), o.get("score"),
                   _get(o, "cloud_model"), _get(o, "sent_ms"), _get(o, "answered_ms"))


Message: TypeAlias = Status | Telemetry | RecordBatch | Ack | LabelFeedback | Command | Escalation | EscalationAnswer

_FROM_OBJ: Final[dict[str, Callable[[str, dict[str, Any]], Message]]] = {
    "status": Status._from_obj,
    "telemetry": Telemetry._from_obj,
    "records": RecordBatch._from_obj,
    "ack": Ack._from_obj,
    "labels": LabelFeedback._from_obj,
    "rollout": Command._from_obj_for("rollout"),
    "config": Command._from_obj_for("config"),
    "escalate": Escalation._from_obj,
    "answer": EscalationAnswer._from_obj,
}


def decode(topic: str, payload: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
    """The message a (topic, payload) pair carries, fully validated; anything else is a ProtocolError.

    The device id comes from the topic. The caller checks that the direction is the one it expects
    (a device acts only on down messages addressed to its own id).
    """
    info = parse_topic(topic)
    try:
        return _FROM_OBJ[info.kind](info.device_id, _load(payload, max_bytes))
    except ProtocolError as e:
        e.topic = topic
        raise


# --------------------------------------------------------------------------------------------------
# Typed record payloads. Their envelopes are defined here; what is inside ``summary``/``detail`` is
# defined by the modules that produce it.

def _record_of_kind(record: object, kind: str) -> Record:
    r = _check_record(record, 0)
    if r.kind != kind:
        raise ProtocolError("bad_value", f"record kind is {r.kind!r}, expected {kind!r}", seq=r.seq)
    return r


@dataclass(frozen=True, slots=True)
class DriftSummary:
    """The envelope of one drift summary record (kind ``"d"``): which model, which window, and the
    summary itself, opaque here and capped at :data:`MAX_OBJECT_BYTES`."""

    model: str
    model_version: str
    start_ms: int
    end_ms: int
    summary: dict[str, Any]
    concept: dict[str, Any] | None = None  # the label tracker's state (accuracy on delayed labels), if any

    def __post_init__(self) -> None:
        _text(self.model, "model")
        _text(self.model_version, "model_version")
        _int(self.start_ms, "start_ms")
        _int(self.end_ms, "end_ms", lo=self.start_ms)
        _obj(self.summary, "summary")
        if self.concept is not None:
            _obj(self.concept, "concept")

    def to_payload(self) -> dict[str, Any]:
        out = {"model": self.model, "model_version": self.model_version, "start_ms": self.start_ms,
               "end_ms": self.end_ms, "summary": self.summary}
        if self.concept is not None:
            out["concept"] = self.concept
        return out

    @classmethod
    def from_payload(cls, payload: object) -> DriftSummary:
        o = _as_object(payload, "payload")
        return cls(_get(o, "model"), _get(o, "model_version"), _get(o, "start_ms"), _get(o, "end_ms"),
                   _get(o, "summary"), o.get("concept"))

    def to_record(self, seq: int, created_ms: int) -> Record:
        return Record(seq, DRIFT, created_ms, self.to_payload())

    @classmethod
    def from_record(cls, record: object) -> DriftSummary:
        r = _record_of_kind(record, DRIFT)
        try:
            return cls.from_payload(r.payload)
        except ProtocolError as e:
            e.seq = r.seq
            raise


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened on the device (kind ``"e"`` records): model swapped, source failed,
    command applied. ``ref`` links a reply to the command or label feedback id it answers."""

    name: str
    severity: str = "info"
    message: str = ""
    ref: str = ""
    detail: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _ident(self.name, "name", _EVENT_NAME_RE)
        if self.severity not in SEVERITIES:
            raise ProtocolError("bad_value", f"severity is {_clip(repr(self.severity), 40)}, expected one of "
                                f"{SEVERITIES}")
        _text(self.message, "message", MAX_MESSAGE_LEN)
        if self.ref:
            _ident(self.ref, "ref")
        else:
            _text(self.ref, "ref")
        if self.detail is not None:
            _obj(self.detail, "detail")

    def to_payload(self) -> dict[str, Any]:
        # Empty fields are left out: events are many and mostly plain.
        p: dict[str, Any] = {"name": self.name, "severity": self.severity}
        if self.message:
            p["message"] = self.message
        if self.ref:
            p["ref"] = self.ref
        if self.detail is not None:
            p["detail"] = self.detail
        return p

    @classmethod
    def from_payload(cls, payload: object) -> Event:
        o = _as_object(payload, "payload")
        return cls(_get(o, "name"), o.get("severity", "info"), o.get("message", ""), o.get("ref", ""),
                   o.get("detail"))

    def to_record(self, seq: int, created_ms: int) -> Record:
        return Record(seq, EVENT, created_ms, self.to_payload())

    @classmethod
    def from_record(cls, record: object) -> Event:
        r = _record_of_kind(record, EVENT)
        try:
            return cls.from_payload(r.payload)
        except ProtocolError as e:
            e.seq = r.seq
            raise


# --------------------------------------------------------------------------------------------------
# Model bundle delivery: one file (a bundle's .tar) as retained chunks on fleet-wide topics, so that
# one publish serves every device, including those that connect later.

BUNDLE_TOPIC_PREFIX: Final = f"{TOPIC_PREFIX}/bundles"
DEFAULT_CHUNK_BYTES: Final = 64 * 1024
MIN_CHUNK_BYTES: Final = 1024
MAX_CHUNK_BYTES: Final = DEFAULT_MAX_BYTES  # a chunk is a whole message payload of its own
MAX_BUNDLE_BYTES: Final = 512 * 1024 * 1024
# The manifest lists one 64-hex digest per chunk (67 bytes with quotes and comma): 3072 of them stay
# well under DEFAULT_MAX_BYTES. A 512 MiB file therefore needs 256 KiB chunks; 64 KiB chunks carry
# files of up to 192 MiB.
MAX_BUNDLE_CHUNKS: Final = 3072
# "cmd" as a bundle id would make edge/v1/bundles/cmd/... look like the cmd topics of a device "bundles".
_RESERVED_BUNDLE_IDS: Final = frozenset({"cmd"})
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_INDEX_RE = re.compile(r"0|[1-9][0-9]{0,5}")
_ID_UNSAFE_RE = re.compile(r"[^A-Za-z0-9_.-]+")


def validate_bundle_id(bundle_id: object) -> str:
    """Return ``bundle_id`` if it is a usable bundle id (the device id rules, and not ``cmd``), else
    raise ``bad_value``."""
    if type(bundle_id) is not str:
        raise _bad_type("bundle_id", bundle_id, "str")
    if _ID_RE.fullmatch(bundle_id) is None or bundle_id in _RESERVED_BUNDLE_IDS:
        raise ProtocolError("bad_value", f"bundle_id {_clip(bundle_id, 80)!r}: expected 1-{MAX_ID_LEN} of "
                            "A-Z a-z 0-9 _ . - starting with a letter or digit, and not 'cmd'")
    return bundle_id


def bundle_id_for(name: str, version: str, sha256: str) -> str:
    """``<name>-<version>-<first 12 hex of sha256>``, with characters an id cannot hold replaced by
    ``_`` and name and version shortened so that the id fits 64 characters. Publishing the same file
    again gives the same id (and the same retained messages)."""
    if type(sha256) is not str or _HEX64_RE.fullmatch(sha256) is None:
        raise ProtocolError("bad_value", f"sha256 {_clip(repr(sha256), 80)} is not 64 lower-case hex digits")
    n = _ID_UNSAFE_RE.sub("_", _text(name, "name"))[:32].strip("_.-") or "bundle"
    v = _ID_UNSAFE_RE.sub("_", _text(version, "version"))[:18] or "0"
    return validate_bundle_id(f"{n}-{v}-{sha256[:12]}")


def bundle_manifest_topic(bundle_id: str) -> str:
    """``edge/v1/bundles/<bundle_id>/manifest``."""
    return f"{BUNDLE_TOPIC_PREFIX}/{validate_bundle_id(bundle_id)}/manifest"


def bundle_chunk_topic(bundle_id: str, index: int) -> str:
    """``edge/v1/bundles/<bundle_id>/c/<index>``: chunk ``index`` (from 0) as raw bytes."""
    _int(index, "index", 0, MAX_BUNDLE_CHUNKS - 1)
    return f"{BUNDLE_TOPIC_PREFIX}/{validate_bundle_id(bundle_id)}/c/{index}"


def bundle_subscription(bundle_id: str | None = None) -> str:
    """``edge/v1/bundles/<bundle_id>/#`` (one bundle's manifest and chunks), or with no id
    ``edge/v1/bundles/+/manifest`` (every bundle's manifest).

    Meant for the cloud and for tools. A device should not subscribe to a large bundle's chunks with
    a wildcard: the broker queues every retained match at once and drops what exceeds its queue
    limit (Mosquitto: ``max_queued_messages``, 1000 by default), so it asks for exact chunk topics
    a few at a time.
    """
    if bundle_id is None:
        return f"{BUNDLE_TOPIC_PREFIX}/+/manifest"
    return f"{BUNDLE_TOPIC_PREFIX}/{validate_bundle_id(bundle_id)}/#"


class BundleTopic(NamedTuple):
    """A parsed bundle topic: which bundle, and ``"manifest"`` or a chunk index."""

    bundle_id: str
    part: str | int


def parse_bundle_topic(topic: object) -> BundleTopic:
    """Split a bundle topic into ``(bundle_id, "manifest" | index)``, or raise ``bad_topic``."""
    if type(topic) is not str:
        raise ProtocolError("bad_topic", f"topic is {_jtype(topic)}, expected str")
    if len(topic.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        raise ProtocolError("bad_topic", f"longer than {MAX_TOPIC_BYTES} bytes", topic=topic)
    parts = topic.split("/")
    if not (len(parts) in (5, 6) and parts[0] == "edge" and parts[1] == "v1" and parts[2] == "bundles"):
        raise ProtocolError("bad_topic", "expected edge/v1/bundles/<bundle_id>/manifest or "
                            "edge/v1/bundles/<bundle_id>/c/<index>", topic=topic)
    try:
        bundle_id = validate_bundle_id(parts[3])
    except ProtocolError as e:
        raise ProtocolError("bad_topic", e.detail, topic=topic) from None
    if len(parts) == 5:
        if parts[4] != "manifest":
            raise ProtocolError("bad_topic", f"expected 'manifest' at level 5, got {_clip(parts[4], 40)!r}",
                                topic=topic)
        return BundleTopic(bundle_id, "manifest")
    if parts[4] != "c" or _INDEX_RE.fullmatch(parts[5]) is None or int(parts[5]) >= MAX_BUNDLE_CHUNKS:
        raise ProtocolError("bad_topic", f"expected c/<index> with index 0..{MAX_BUNDLE_CHUNKS - 1} (no leading "
                            f"zeros), got {_clip('/'.join(parts[4:]), 40)!r}", topic=topic)
    return BundleTopic(bundle_id, int(parts[5]))


def _hex64(v: object, name: str) -> str:
    if type(v) is not str:
        raise _bad_type(name, v, "str")
    if _HEX64_RE.fullmatch(v) is None:
        raise ProtocolError("bad_value", f"{name} {_clip(repr(v), 80)} is not a sha256 (64 lower-case hex digits)")
    return v


@dataclass(frozen=True, slots=True)
class BundleManifest:
    """What a device needs to fetch and check one bundle file: its size and sha256, and the sha256 of
    every chunk, so that each chunk is checked as it arrives and a bad one is named.

    Chunk ``i`` is bytes ``[i * chunk_size, min(size, (i + 1) * chunk_size))`` of the file. Retained
    on :func:`bundle_manifest_topic`, published after all chunks (a device that sees it finds them).
    Validated like every message: sizes consistent, ``len(chunks) == ceil(size / chunk_size)``,
    digests 64 lower-case hex, ``size`` at most :data:`MAX_BUNDLE_BYTES`, ``chunk_size`` within
    :data:`MIN_CHUNK_BYTES`..:data:`MAX_CHUNK_BYTES`, at most :data:`MAX_BUNDLE_CHUNKS` chunks.
    """

    QOS: ClassVar[int] = 1
    RETAIN: ClassVar[bool] = True

    bundle_id: str
    name: str
    version: str
    size: int
    sha256: str
    chunk_size: int
    chunks: tuple[str, ...]

    def __post_init__(self) -> None:
        validate_bundle_id(self.bundle_id)
        _text(self.name, "name")
        _text(self.version, "version")
        _int(self.size, "size", 1, MAX_BUNDLE_BYTES)
        _hex64(self.sha256, "sha256")
        _int(self.chunk_size, "chunk_size", MIN_CHUNK_BYTES, MAX_CHUNK_BYTES)
        chunks = _list(self.chunks, "chunks")
        want = -(-self.size // self.chunk_size)
        if len(chunks) != want:
            raise ProtocolError("bad_value", f"chunks has {len(chunks)} digests, expected {want} "
                                f"(ceil(size {self.size} / chunk_size {self.chunk_size}))")
        if want > MAX_BUNDLE_CHUNKS:
            raise ProtocolError("bad_value", f"{want} chunks > {MAX_BUNDLE_CHUNKS}: use a larger chunk_size")
        _set(self, "chunks", tuple(_hex64(c, f"chunks[{i}]") for i, c in enumerate(chunks)))

    @property
    def topic(self) -> str:
        return bundle_manifest_topic(self.bundle_id)

    @property
    def count(self) -> int:
        """How many chunks the file has."""
        return len(self.chunks)

    def chunk_topic(self, index: int) -> str:
        return bundle_chunk_topic(self.bundle_id, index)

    def chunk_span(self, index: int) -> tuple[int, int]:
        """``(offset, length)`` of chunk ``index`` in the file."""
        _int(index, "index", 0, self.count - 1)
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    def to_wire(self, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
        return _finish({"v": VERSION, "bundle_id": self.bundle_id, "name": self.name, "version": self.version,
                        "size": self.size, "sha256": self.sha256, "chunk_size": self.chunk_size,
                        "chunks": self.chunks}, max_bytes)

    @classmethod
    def from_wire(cls, payload: bytes | bytearray | memoryview, topic: str | None = None, *,
                  max_bytes: int = DEFAULT_MAX_BYTES) -> BundleManifest:
        """Decode and validate; with ``topic``, it must be this bundle's manifest topic (the topic is what
        the broker's ACL vouches for, so its id must agree with the payload's)."""
        try:
            topic_id = None
            if topic is not None:
                topic_id, part = parse_bundle_topic(topic)
                if part != "manifest":
                    raise ProtocolError("bad_topic", "a chunk topic, expected .../manifest")
            o = _load(payload, max_bytes)
            m = cls(_get(o, "bundle_id"), _get(o, "name"), _get(o, "version"), _get(o, "size"), _get(o, "sha256"),
                    _get(o, "chunk_size"), _get(o, "chunks"))
            if topic_id is not None and m.bundle_id != topic_id:
                raise ProtocolError("bad_value", f"bundle_id {m.bundle_id!r} differs from the topic's {topic_id!r}")
        except ProtocolError as e:
            e.topic = topic
            raise
        return m


# The bundle-delivery names, appended with their section.
__all__ += [
    "BUNDLE_TOPIC_PREFIX",
    "DEFAULT_CHUNK_BYTES",
    "MAX_BUNDLE_BYTES",
    "MAX_BUNDLE_CHUNKS",
    "MAX_CHUNK_BYTES",
    "MIN_CHUNK_BYTES",
    "BundleManifest",
    "BundleTopic",
    "bundle_chunk_topic",
    "bundle_id_for",
    "bundle_manifest_topic",
    "bundle_subscription",
    "parse_bundle_topic",
    "validate_bundle_id",
]
