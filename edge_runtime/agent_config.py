"""The agent's configuration file (``/etc/edge-runtime/agent.toml``, or ``run --config FILE``).

One TOML file gives everything ``edge-runtime run`` takes as flags; it is checked against :data:`SCHEMA`
(unknown keys and wrong types are errors naming the key, the file and the line) and turned into the
defaults of the ``run`` command. Precedence, highest first: a command-line flag, the key's environment
variable (the ``env`` column of :data:`SCHEMA`), the file, the built-in default. ``devices/agent.example.toml``
documents every key; a test checks it and the README's table against this schema.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.config import TomlDoc, check_table
from edge_runtime.errors import ConfigError

DEFAULT_PATH = "/etc/edge-runtime/agent.toml"


@dataclass(frozen=True)
class Key:
    table: str            # "" for the top level
    name: str
    type: type | tuple[type, ...]
    dest: str              # the `run` argument it sets
    doc: str
    env: str | None = None
    convert: Callable[[Any], Any] | None = None


def _split(v: Any) -> list[str]:
    return [s.strip() for s in str(v).split(",") if s.strip()] if isinstance(v, str) else list(v)


SCHEMA: tuple[Key, ...] = (
    Key("", "device_id", str, "device_id", "this device's id: MQTT client id and topic level",
        "EDGE_RUNTIME_DEVICE_ID"),
    Key("", "profile", str, "profile", "device profile name or file (default: detected)", "EDGE_RUNTIME_PROFILE"),
    Key("", "tags", list, "tag", "labels rollout plans target, e.g. [\"site:lab\"]", "EDGE_RUNTIME_TAGS", _split),
    Key("", "state_dir", str, "state_dir", "rollout state and bundles", "EDGE_RUNTIME_STATE_DIR"),
    Key("", "log_level", str, "log_level", "debug, info, warning or error", "EDGE_RUNTIME_LOG_LEVEL"),
    Key("keys", "public", list, "key", "public keys bundles must be signed with", "EDGE_RUNTIME_PUBLIC_KEYS",
        _split),
    Key("broker", "url", str, "broker", "mqtt://host:1883, mqtts://host:8883 (TLS), mqtt311://...",
        "EDGE_RUNTIME_BROKER"),
    Key("broker", "username", str, "broker_username", "user name (or in the URL)", "EDGE_RUNTIME_BROKER_USERNAME"),
    Key("broker", "password_file", str, "broker_password_file", "file holding the password (kept out of the config)",
        "EDGE_RUNTIME_BROKER_PASSWORD_FILE"),
    Key("broker", "ca_file", str, "broker_ca_file", "CA certificate for mqtts://"),
    Key("broker", "cert_file", str, "broker_cert_file", "client certificate (mutual TLS)"),
    Key("broker", "key_file", str, "broker_key_file", "client key (mutual TLS)"),
    Key("broker", "sync", bool, "sync", "false: keep everything local (like --no-sync)"),
    Key("buffer", "path", str, "buffer", "the outbox (SQLite)", "EDGE_RUNTIME_BUFFER"),
    Key("buffer", "max_mb", (int, float), "buffer_max_mb", "bound on disk; the oldest predictions go first"),
    Key("buffer", "drain_timeout_s", (int, float), "drain_timeout", "how long to keep syncing at exit"),
    Key("drift", "enabled", bool, "drift", "false: no drift monitoring (like --no-drift)"),
    Key("drift", "reference", str, "drift_reference", "a reference profile instead of the bundle's"),
    Key("drift", "thread", bool, "drift_thread", "run the monitor on its own thread"),
    Key("drift", "frame_health", bool, "frame_health", "covered-lens/frozen/blur checks on video and cameras"),
    Key("drift", "summary_interval_s", (int, float), "drift_summary_interval",
        "drift summaries to the cloud every S seconds (and on each alarm)"),
    Key("outputs", "low_confidence", (int, float), "low_confidence", "top-1 scores below this are low-confidence"),
    Key("escalation", "share", str, "escalate_share", "none (default), features, downscaled or raw"),
    Key("escalation", "policy", str, "escalation_policy", "policy JSON instead of the bundle's"),
    Key("escalation", "feedback", bool, "escalate_feedback", "cloud answers also count as label feedback"),
    Key("review", "samples", str, "review_samples", "none, low-confidence, drift or both"),
    Key("review", "inputs", str, "review_inputs", "none or raw: whether review samples carry the input"),
    Key("review", "per_hour", int, "review_per_hour", "review samples per hour at most"),
    Key("review", "max_kb", (int, float), "review_max_kb", "size cap of an input sent for review"),
    Key("metrics", "port", int, "metrics_port", "Prometheus /metrics port (0: off)", "EDGE_RUNTIME_METRICS_PORT"),
    Key("metrics", "interval_s", (int, float), "metrics_interval", "durable metric snapshots every S seconds"),
    Key("metrics", "telemetry_interval_s", (int, float), "telemetry_interval", "live telemetry every S seconds"),
    Key("metrics", "status_interval_s", (int, float), "status_interval", "a status line in the log every S seconds"),
    Key("rollouts", "enabled", bool, "rollouts", "false: ignore rollout orders (like --no-rollouts)"),
    Key("rollouts", "latency_budget_ms", (int, float), "latency_budget_ms",
        "refuse a rolled-out model slower than this (median, ms)"),
)

MODEL_KEYS: dict[str, type | tuple[type, ...]] = {
    "path": str, "name": str, "source": str, "batch": int, "max_wait_ms": (int, float),
}
MODEL_DOC = {"path": "a bundle directory/.tar or an .onnx file (required)", "name": "the pipeline's name",
             "source": "synthetic[:HZ], npy:FILE, csv:FILE, stdin, video:FILE, camera:N",
             "batch": "micro-batch size", "max_wait_ms": "how long a micro-batch waits for more inputs"}
_NEGATED = {"sync": "no_sync", "drift": "no_drift", "frame_health": "no_frame_health", "rollouts": "no_rollouts"}


def _tables() -> dict[str, dict[str, type | tuple[type, ...]]]:
    out: dict[str, dict[str, type | tuple[type, ...]]] = {}
    for k in SCHEMA:
        out.setdefault(k.table, {})[k.name] = k.type
    out[""].update({t: dict for t in out if t}, model=list)
    return out


def load(path: str | Path, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``run`` defaults from a config file (and the environment, which wins over it)."""
    env = os.environ if env is None else env
    doc = TomlDoc.load(path)
    tables = _tables()
    check_table(doc, doc.data, tables[""])
    out: dict[str, Any] = {}
    for k in SCHEMA:
        table = doc.data.get(k.table, {}) if k.table else doc.data
        if k.table:
            check_table(doc, table, tables[k.table], (k.table,))
        value = table.get(k.name)
        if k.env and env.get(k.env):
            value = env[k.env]
            if k.type is bool:
                value = value.lower() in ("1", "true", "yes", "on")
            elif k.type in (int, (int, float)):
                try:
                    value = int(value) if k.type is int else float(value)
                except ValueError:
                    raise ConfigError(f"${k.env} must be a number, got {value!r}") from None
        if value is None:
            continue
        if k.convert is not None:
            value = k.convert(value)
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise doc.error(f"key '{k.name}' must be an array of strings", (k.table,) if k.table else (), k.name)
        if k.dest in _NEGATED:
            out[_NEGATED[k.dest]] = not value
        else:
            out[k.dest] = value
    models = doc.data.get("model", [])
    if models:
        if not all(isinstance(m, dict) for m in models):
            raise doc.error("[[model]] entries must be tables", (), "model")
        specs, sources, batches = [], [], set()
        for m in models:
            check_table(doc, m, MODEL_KEYS, ("model",))
            if "path" not in m:
                raise ConfigError("a [[model]] entry has no 'path'", path=doc.path, key="path")
            specs.append(f"{m['name']}={m['path']}" if m.get("name") else m["path"])
            sources.append(m.get("source", "synthetic"))
            batches.add((m.get("batch"), m.get("max_wait_ms")))
        if len(batches) > 1:
            raise doc.error("every [[model]] must use the same batch and max_wait_ms (one agent-wide setting)",
                            ("model",), "batch")
        out["model"] = specs
        out["source"] = sources
        batch, wait = batches.pop()
        if batch is not None:
            out["batch"] = batch
        if wait is not None:
            out["max_wait_ms"] = float(wait)
    return out


def reference_table() -> str:
    """The README's configuration table, from :data:`SCHEMA` (a test keeps the README in step)."""
    rows = ["| key | env | meaning |", "|---|---|---|"]
    for k in SCHEMA:
        name = f"[{k.table}] {k.name}" if k.table else k.name
        rows.append(f"| `{name}` | {f'`${k.env}`' if k.env else ''} | {k.doc} |")
    for name, _t in MODEL_KEYS.items():
        rows.append(f"| `[[model]] {name}` | | {MODEL_DOC[name]} |")
    return "\n".join(rows)
