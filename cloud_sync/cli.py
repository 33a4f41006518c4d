"""`cloud-sync ...`: the fleet side. `serve` ingests device records over MQTT into a store and acks them;
`export` streams stored records out as CSV, JSON lines or Parquet; `status`, `devices`, `alerts` and
`rollout ...` talk to a running server's JSON API."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from edge_runtime import __version__

log = logging.getLogger("cloud_sync")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cloud-sync",
        description="Cloud counterpart of edge-runtime: ingests what devices send over MQTT into a store, "
                    "deduplicated, and acknowledges each committed batch so devices can free their buffers.",
    )
    p.add_argument("--version", action="version", version=f"cloud-sync {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("serve", help="ingest device records into the store and acknowledge them",
                       description="Subscribe to every device's records and status, commit records to the store "
                                   "(deduplicated on device, boot and sequence number) and acknowledge each "
                                   "batch after the commit. Runs until SIGINT/SIGTERM.")
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--broker", metavar="URL", help="mqtt://[user:pass@]host:1883, mqtts://..., mqtt311://...")
    where.add_argument("--embedded-broker", action="store_true",
                       help="start an MQTT broker in this process tree (iotcore/rumqttd, MQTT 3.1.1; cloud extra), "
                            "for demos and single-box setups")
    s.add_argument("--listen", default="127.0.0.1", metavar="ADDR",
                   help="embedded broker: address to listen on (default 127.0.0.1; 0.0.0.0 exposes it)")
    s.add_argument("--port", type=int, default=1883, help="embedded broker: port (default 1883)")
    s.add_argument("--db", default="cloud-sync.db", metavar="URL",
                   help="the store: a SQLite file (default cloud-sync.db) or postgresql://user@host/db")
    s.add_argument("--rules", metavar="FILE.toml",
                   help="alert rules (see cloud_sync/rules.example.toml); without it no alerts fire")
    s.add_argument("--http", default="127.0.0.1:8080", metavar="ADDR:PORT",
                   help="serve the dashboard and JSON API here (default 127.0.0.1:8080; 'off': none)")
    s.add_argument("--token", default=os.environ.get("CLOUD_SYNC_TOKEN"), metavar="T",
                   help="bearer token for changes through the API (ack, review); default $CLOUD_SYNC_TOKEN. "
                        "Without one, changes are accepted from loopback clients only")
    s.add_argument("--review-below", type=float, default=0.5, metavar="S",
                   help="predictions with a top-1 score below S enter the review queue (default 0.5)")
    s.add_argument("--review-per-device-hour", type=int, default=20, metavar="N",
                   help="at most N review items per device and hour (default 20)")
    s.add_argument("--retrain-command", metavar="CMD",
                   help="run CMD REQUEST.json when a rule marked retrain fires (the request's path is also "
                        "in $RETRAIN_REQUEST); its exit status and output are recorded")
    s.add_argument("--retrain-topic", metavar="TOPIC", help="publish retraining requests on this MQTT topic")
    s.add_argument("--max-upload-mb", type=float, default=512.0, metavar="MB",
                   help="largest bundle `rollout start` may upload (default 512)")
    s.add_argument("--escalation-model", action="append", default=[], metavar="[MODEL=]PATH",
                   help="a larger ONNX model that answers the inputs devices escalate (repeatable; MODEL= names "
                        "the device model it answers for, without it: every other model)")
    s.add_argument("--bundle", action="append", default=[], metavar="DIR",
                   help="a model bundle the fleet runs (repeatable): its reference profile gives fleet drift "
                        "distances and its build accuracy the baseline of accuracy-drop rules")
    s.add_argument("--bundles-dir", default=os.environ.get("CLOUD_SYNC_BUNDLES", "cloud-sync-bundles"), metavar="DIR",
                   help="where rollouts keep the bundles they publish (republished after a broker restart; "
                        "default $CLOUD_SYNC_BUNDLES or cloud-sync-bundles)")
    s.add_argument("--chunk-kb", type=int, metavar="KB",
                   help="bundle chunk size for rollouts (default 64; 16 with --embedded-broker, whose broker "
                        "refuses messages over about 20 KB)")
    s.add_argument("--keep-predictions-days", type=float, default=30.0, metavar="D",
                   help="delete prediction records older than D days (default 30; 0: keep all)")
    s.add_argument("--keep-history-days", type=float, default=365.0, metavar="D",
                   help="delete metric, drift and event history older than D days (default 365; 0: keep all)")
    s.add_argument("--client-id", default="cloud-sync", metavar="ID")
    s.add_argument("--group", default="ingest", help="MQTT 5 shared-subscription group (default ingest)")
    s.add_argument("--stats-interval", type=float, default=30.0, metavar="S",
                   help="log ingest counters every S seconds (0: never)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    for name, what in (("status", "fleet summary: devices online, alerts, model versions"),
                       ("devices", "one line per device: state, model, latency, errors, drift"),
                       ("alerts", "alerts (firing and acknowledged; --all for resolved too); --ack ID")):
        c = sub.add_parser(name, help=what, description=f"{what[0].upper()}{what[1:]}, from a running "
                           "`cloud-sync serve` (its JSON API).")
        c.add_argument("--url", default=os.environ.get("CLOUD_SYNC_URL", "http://127.0.0.1:8080"),
                       help="the server (default $CLOUD_SYNC_URL or http://127.0.0.1:8080)")
        c.add_argument("--json", action="store_true", help="print the API's JSON")
        c.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
        if name == "alerts":
            c.add_argument("--all", action="store_true", help="include resolved alerts")
            c.add_argument("--ack", metavar="ID", help="acknowledge this alert")
            c.add_argument("--by", default=os.environ.get("USER", "cli"), help="who acknowledges (default $USER)")
            c.add_argument("--token", default=os.environ.get("CLOUD_SYNC_TOKEN"), metavar="T",
                           help="bearer token (default $CLOUD_SYNC_TOKEN)")

    _add_rollout_parser(sub)

    e = sub.add_parser("export", help="write stored records out as CSV, JSON lines or Parquet",
                       description="Stream the records of a store (oldest first, page by page: the whole table is "
                                   "never loaded) to a file or stdout. Columns: device_id, boot_id, seq, kind, "
                                   "created_ms, received_ms, payload (JSON).")
    e.add_argument("--db", required=True, metavar="URL",
                   help="the store: a SQLite path, sqlite:///PATH or postgresql://user@host/db")
    e.add_argument("--since", required=True, type=_since_arg, metavar="WHEN",
                   help="records created at or after WHEN: ISO 8601 (2026-11-26T08:00:00Z; without a zone, UTC) "
                        "or an age back from now (-90s, -30m, -1h, -7d, -2w)")
    e.add_argument("--format", default="jsonl", choices=EXPORT_FORMATS,
                   help="jsonl (default), csv, or parquet (needs pyarrow)")
    e.add_argument("--kind", type=_kinds_arg, metavar="KINDS",
                   help="comma-separated record kinds: p,m,d,e or prediction,metric,drift,event (default: all)")
    e.add_argument("--out", metavar="FILE",
                   help="write to FILE, which appears only once complete (default: stdout)")
    e.add_argument("--progress-rows", type=int, default=100_000, metavar="N",
                   help="a progress line on stderr every N rows (default 100000; 0: none)")
    e.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return p


def _add_rollout_parser(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("CLOUD_SYNC_URL", "http://127.0.0.1:8080"),
                        help="the server (default $CLOUD_SYNC_URL or http://127.0.0.1:8080)")
    common.add_argument("--token", default=os.environ.get("CLOUD_SYNC_TOKEN"), metavar="T",
                        help="bearer token for changes (default $CLOUD_SYNC_TOKEN)")
    common.add_argument("--by", default=os.environ.get("USER", "cli"), help="who acts (default $USER)")
    common.add_argument("--json", action="store_true", help="print the API's JSON")
    common.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    r = sub.add_parser("rollout", help="model rollouts: start, status, approve, reject, pause, resume, rollback",
                       description="Model rollouts on a running `cloud-sync serve` (its JSON API): a plan "
                                   "(cloud_sync/plan.example.toml) moves a bundle through shadow and ramp stages, "
                                   "judged by the plan's gates.")
    acts = r.add_subparsers(dest="rollout_command", metavar="ACTION", required=True)
    s = acts.add_parser("start", parents=[common], help="start a rollout of a bundle under a plan",
                        description="Send the plan and the bundle to the server (a bundle found here is uploaded, "
                                    "a directory archived first), which checks both against the fleet, "
                                    "publishes the bundle and orders the first stage.")
    s.add_argument("plan", metavar="PLAN.toml", help="the rollout plan (read here, sent as text)")
    s.add_argument("--bundle", required=True, metavar="PATH",
                   help="the bundle (.tar or directory): uploaded when it exists here, else a path on the server")
    s.add_argument("--on-server", action="store_true",
                   help="PATH names a bundle on the server's machine: do not upload")
    s = acts.add_parser("status", parents=[common], help="every rollout, or one in detail")
    s.add_argument("id", nargs="?", metavar="ID", help="a rollout id: its devices, gates and log")
    for name, what in (("approve", "approve what the rollout waits for (enter the next stage)"),
                       ("reject", "refuse what the rollout waits for: roll back"),
                       ("pause", "stop advancing; devices keep their roles"),
                       ("resume", "go on after a pause"),
                       ("rollback", "every device back to the previous version")):
        s = acts.add_parser(name, parents=[common], help=what)
        s.add_argument("id", metavar="ID", help="the rollout id")
        if name in ("reject", "pause", "rollback"):
            s.add_argument("--reason", default="requested from the command line" if name == "rollback" else "",
                           metavar="R", help="why (kept in the rollout's log)")


# -- export ----------------------------------------------------------------------------------------

EXPORT_FORMATS = ("jsonl", "csv", "parquet")
EXPORT_COLUMNS = ("device_id", "boot_id", "seq", "kind", "created_ms", "received_ms", "payload")
_AGE_RE = re.compile(r"-(\d+(?:\.\d+)?)([smhdw])")
_AGE_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_KIND_RE = re.compile(r"[a-z][a-z0-9_]{0,15}")


def parse_since(text: str, now_ms: int) -> int:
    """Milliseconds since the epoch for ``--since``: an ISO 8601 time (UTC unless it names a zone)
    or an age such as ``-1h`` counted back from ``now_ms``."""
    text = text.strip()
    m = _AGE_RE.fullmatch(text)
    if m:
        return now_ms - round(float(m.group(1)) * _AGE_UNIT_S[m.group(2)] * 1000)
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither an ISO 8601 time (2026-11-26T08:00:00Z) nor an age "
                         "(-90s, -30m, -1h, -7d, -2w)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return round(t.timestamp() * 1000)


def _attach_ages(argv: Sequence[str]) -> list[str]:
    """``--since -1h`` as ``--since=-1h``: argparse takes a value that starts with '-' for an option."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--since" and i + 1 < len(argv) and _AGE_RE.fullmatch(argv[i + 1]):
            out.append(f"--since={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _since_arg(text: str) -> int:
    try:
        return parse_since(text, int(time.time() * 1000))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _kinds_arg(text: str) -> list[str]:
    from edge_runtime.core.protocol import RECORD_KIND_CODES

    kinds = []
    for item in text.split(","):
        k = RECORD_KIND_CODES.get(item.strip(), item.strip())
        if not _KIND_RE.fullmatch(k):
            raise argparse.ArgumentTypeError(f"{item.strip()!r} is not a record kind (p, m, d, e, or their full names)")
        kinds.append(k)
    return kinds


def _import_pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        from edge_runtime.errors import EdgeRuntimeError

        raise EdgeRuntimeError("--format parquet needs pyarrow, which is not installed: pip install pyarrow") from None
    return pa, pq


class _Counter:
    """Passes rows through and counts them, with a progress line on stderr every ``every`` rows."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.n = 0
        self.t0 = time.monotonic()

    def __call__(self, rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for row in rows:
            yield row
            self.n += 1
            if self.every > 0 and self.n % self.every == 0:
                rate = self.n / max(time.monotonic() - self.t0, 1e-9)
                print(f"export: {self.n:,} rows ({rate:,.0f}/s)", file=sys.stderr, flush=True)


def _write_jsonl(rows: Iterable[dict[str, Any]], out: IO[bytes]) -> None:
    for r in rows:
        # The payload is spliced in as stored (JSON text): no decode and re-encode per row.
        head = json.dumps({k: r[k] for k in EXPORT_COLUMNS[:-1]}, separators=(",", ":"))
        out.write(f'{head[:-1]},"payload":{r["payload"]}}}\n'.encode())


def _write_csv(rows: Iterable[dict[str, Any]], out: IO[bytes]) -> None:
    text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
    try:
        w = csv.writer(text)
        w.writerow(EXPORT_COLUMNS)
        for r in rows:
            w.writerow([r[k] for k in EXPORT_COLUMNS])
        text.flush()
    finally:
        text.detach()  # the caller owns ``out``


def _write_parquet(rows: Iterable[dict[str, Any]], out: IO[bytes], row_group: int = 50_000) -> None:
    pa, pq = _import_pyarrow()
    schema = pa.schema([("device_id", pa.string()), ("boot_id", pa.string()), ("seq", pa.int64()),
                        ("kind", pa.string()), ("created_ms", pa.int64()), ("received_ms", pa.int64()),
                        ("payload", pa.string())])
    with pq.ParquetWriter(out, schema) as writer:
        cols: dict[str, list[Any]] = {k: [] for k in EXPORT_COLUMNS}
        for r in rows:
            for k in EXPORT_COLUMNS:
                cols[k].append(r[k])
            if len(cols["seq"]) >= row_group:
                writer.write_table(pa.table(cols, schema=schema))
                cols = {k: [] for k in EXPORT_COLUMNS}
        if cols["seq"]:
            writer.write_table(pa.table(cols, schema=schema))


def cmd_export(args: argparse.Namespace) -> int:
    from cloud_sync.store import open_store

    if args.format == "parquet":
        _import_pyarrow()  # before anything is opened or written
    writer = {"jsonl": _write_jsonl, "csv": _write_csv, "parquet": _write_parquet}[args.format]
    counter = _Counter(args.progress_rows)
    with open_store(args.db, create=False) as store:
        rows = counter(store.export(args.since, args.kind, decode=False))
        if args.out is None:
            try:
                writer(rows, sys.stdout.buffer)
                sys.stdout.buffer.flush()
            except BrokenPipeError:  # `cloud-sync export ... | head`: the reader has what it wanted
                # Python would fail flushing stdout at exit; point it at /dev/null instead.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return 0
            where = "stdout"
        else:
            final = Path(args.out)
            partial = final.with_name(final.name + ".partial")
            try:
                with partial.open("wb") as f:
                    writer(rows, f)
                partial.replace(final)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            where = str(final)
    print(f"export: {counter.n:,} rows to {where} in {time.monotonic() - counter.t0:.1f} s", file=sys.stderr)
    return 0


def start_embedded_broker(listen: str, port: int) -> Any:
    try:
        from iotcore import Broker
    except ImportError as e:
        from edge_runtime.errors import MissingExtraError

        raise MissingExtraError("--embedded-broker", "cloud", "iotcore") from e
    return Broker(port=port, listen=listen).start()


def cmd_serve(args: argparse.Namespace) -> int:
    from cloud_sync.service import IngestService

    broker = None
    url = args.broker
    if args.embedded_broker:
        broker = start_embedded_broker(args.listen, args.port)
        host = "127.0.0.1" if args.listen in ("0.0.0.0", "") else args.listen
        url = f"mqtt311://{host}:{args.port}"
        log.info("embedded broker listening on %s:%d (MQTT 3.1.1)", args.listen, args.port)
    from edge_runtime.errors import EdgeRuntimeError, MissingExtraError

    rules = None
    if args.rules:
        from cloud_sync.rules import load_rules

        rules = load_rules(Path(args.rules))
        log.info("alert rules: %d from %s", len(rules), args.rules)
    from cloud_sync.escalation import parse_model_args

    svc = IngestService(url, args.db, client_id=args.client_id, group=args.group, rules=rules,
                        review_below=args.review_below, review_per_device_hour=args.review_per_device_hour,
                        retrain_command=args.retrain_command, retrain_topic=args.retrain_topic,
                        bundles_dir=args.bundles_dir,
                        chunk_size=(args.chunk_kb or (16 if args.embedded_broker else 64)) * 1024,
                        keep_predictions_s=args.keep_predictions_days * 86400 or None,
                        keep_history_s=args.keep_history_days * 86400 or None,
                        escalation_models=parse_model_args(args.escalation_model) or None)
    for b in args.bundle:
        try:
            name, version = svc.hub.register_bundle(b)
        except ValueError as e:
            raise EdgeRuntimeError(str(e)) from e
        log.info("model %s version %s from %s", name, version, b)
    web = None
    if args.http != "off":
        host, _, port = args.http.rpartition(":")
        try:
            web = start_web(svc.hub, host or "127.0.0.1", int(port), args.token, args.max_upload_mb)
        except MissingExtraError as e:  # ingest is the job; the dashboard is a view of it
            log.warning("no dashboard: %s", e)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    svc.start()
    log.info("ingesting from %s into %s", url, args.db)
    try:
        while not stop.wait(args.stats_interval if args.stats_interval > 0 else 3600):
            log.info("ingest: %s", json.dumps(svc.stats()))
    finally:
        stats = svc.stats()
        if web is not None:
            web.stop()
        svc.stop()
        if broker is not None:
            broker.stop()
        log.info("stopped: %s", json.dumps(stats))
    return 0


def start_web(hub: Any, host: str, port: int, token: str | None, max_upload_mb: float = 512.0) -> Any:
    """The dashboard and JSON API on uvicorn in a thread, listening when this returns (``stop()`` ends it)."""
    try:
        from cloud_sync.web import WebServer, create_app, serve_note
    except ImportError as e:
        from edge_runtime.errors import MissingExtraError

        raise MissingExtraError("the dashboard (--http)", "web", "starlette, uvicorn, jinja2") from e
    note = serve_note(host, token or None)
    if note:
        log.warning("%s", note)
    web = WebServer(create_app(hub, token=token or None, max_upload_mb=max_upload_mb), host=host, port=port).start()
    log.info("dashboard on %s/", web.url)
    return web


# -- client commands: status, devices, alerts ------------------------------------------------------

def _api(url: str, path: str, *, method: str = "GET", body: dict[str, Any] | None = None,
         token: str | None = None, timeout: float = 10.0) -> Any:
    import urllib.request

    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method=method, headers=headers)
    return _send(req, url, f"{method} {url}{path}", timeout)


def _send(req: Any, url: str, what: str, timeout: float) -> Any:
    """The JSON answer to ``req``; an HTTP error or an unreachable server as an EdgeRuntimeError."""
    import urllib.error
    import urllib.request

    from edge_runtime.errors import EdgeRuntimeError

    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:300]
        raise EdgeRuntimeError(f"{what}: HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        raise EdgeRuntimeError(f"cannot reach cloud-sync at {url} ({getattr(e, 'reason', e)}): is "
                               "`cloud-sync serve` running, and is --url right?") from None


def _upload_bundle(url: str, local: Path, token: str | None) -> str:
    """Send a local bundle (.tar, or a directory: archived first) to the server; its path there."""
    import tempfile
    import urllib.request

    from edge_runtime.bundle import MANIFEST, _write_tar
    from edge_runtime.errors import EdgeRuntimeError

    with tempfile.TemporaryDirectory(prefix="cloud-sync-upload-") as tmp:
        tar = local
        if local.is_dir():
            if not (local / MANIFEST).is_file():
                raise EdgeRuntimeError(f"{local} has no {MANIFEST}: not a model bundle")
            tar = Path(tmp) / "bundle.tar"
            _write_tar(local, tar)
        size = tar.stat().st_size
        log.info("uploading %s (%.1f MB) to %s", local, size / 1e6, url)
        headers = {"Content-Type": "application/x-tar", "Content-Length": str(size), "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        with tar.open("rb") as f:
            req = urllib.request.Request(url.rstrip("/") + "/api/v1/bundles", data=f, method="POST", headers=headers)
            return str(_send(req, url, f"uploading {local}", 600)["bundle"])


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [[("-" if v is None else str(v)) for v in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def _num(v: Any, fmt: str) -> str | None:
    return None if v is None else format(v, fmt)


def cmd_status(args: argparse.Namespace) -> int:
    snap = _api(args.url, "/api/v1/fleet")
    if args.json:
        print(json.dumps(snap, indent=2))
        return 0
    d, a = snap.get("devices", {}), snap.get("alerts", {})
    print(f"devices: {d.get('total', 0)} ({d.get('online', 0)} online, {d.get('stale', 0)} stale, "
          f"{d.get('offline', 0)} offline); alerts: {a.get('firing', 0)} firing, "
          f"{a.get('acknowledged', 0)} acknowledged")
    rows = [[m.get("model"), m.get("version"), m.get("devices"), m.get("predictions"),
             _num(m.get("error_rate"), ".4f"), _num((m.get("p99_ms") or {}).get("worst"), ".1f"),
             _num((m.get("accuracy") or {}).get("accuracy"), ".3f"), m.get("drift_alarms")]
            for m in snap.get("models", [])]
    if rows:
        print(_table(rows, ["model", "version", "devices", "predictions", "error_rate", "p99_ms", "accuracy",
                            "drift_alarms"]))
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    devs = _api(args.url, "/api/v1/devices")
    if args.json:
        print(json.dumps(devs, indent=2))
        return 0
    rows = [[r.get("id"), r.get("state"), ", ".join(f"{m.get('name')}@{m.get('version')}" for m in r.get("models", [])),
             _num(r.get("p99_ms"), ".1f"), _num(r.get("throughput_per_s"), ".1f"), _num(r.get("error_rate"), ".4f"),
             _num(r.get("cpu_percent"), ".0f"), _num(r.get("rss_mb"), ".0f"), _num(r.get("temperature_c"), ".0f"),
             _num(r.get("drift_score"), ".2f"), "ALARM" if r.get("alarm") else ""] for r in devs]
    print(_table(rows, ["device", "state", "models", "p99_ms", "per_s", "err_rate", "cpu%", "rss_mb", "temp_c",
                        "drift", ""]))
    return 0


def cmd_alerts(args: argparse.Namespace) -> int:
    if args.ack:
        from urllib.parse import quote

        out = _api(args.url, f"/api/v1/alerts/{quote(args.ack, safe='')}/ack", method="POST",
                   body={"by": args.by}, token=args.token)
        print(json.dumps(out, indent=2) if args.json else f"acknowledged {args.ack}")
        return 0
    alerts = _api(args.url, "/api/v1/alerts")
    if not args.all:
        alerts = [a for a in alerts if a.get("state") != "resolved"]
    if args.json:
        print(json.dumps(alerts, indent=2))
        return 0
    rows = [[a.get("id"), a.get("state"), a.get("severity"), a.get("message")] for a in alerts]
    print(_table(rows, ["id", "state", "severity", "message"]) if rows else "no alerts")
    return 0


def _gates_text(gates: list[dict[str, Any]]) -> str:
    def short(v: Any) -> str:
        return "?" if v is None else f"{v:.3f}".rstrip("0").rstrip(".")

    return "; ".join(f"{g.get('name')} {short(g.get('value'))} {g.get('op')} {short(g.get('limit'))}: "
                     f"{g.get('status')}" for g in gates) or "-"


def _rollout_line(r: dict[str, Any]) -> str:
    pending = r.get("pending_approval")
    wait = f"; waits for approval of {pending.get('to_stage')}" if pending else ""
    return (f"{r.get('id')}: {r.get('model')} {r.get('versions')}, level {r.get('level')}, {r.get('state')} at "
            f"{r.get('stage')}{wait}")


def cmd_rollout(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    from edge_runtime.errors import EdgeRuntimeError

    action = args.rollout_command
    if action == "start":
        try:
            text = Path(args.plan).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise EdgeRuntimeError(f"cannot read the plan {args.plan}: {e}") from None
        local = Path(args.bundle)
        bundle = _upload_bundle(args.url, local, args.token) if local.exists() and not args.on_server \
            else args.bundle
        out = _api(args.url, "/api/v1/rollouts", method="POST", token=args.token, timeout=600,
                   body={"plan": text, "plan_name": args.plan, "bundle": bundle, "by": args.by})
        print(json.dumps(out, indent=2) if args.json else f"started {_rollout_line(out)} on {out.get('devices')} "
              f"device(s)")
        return 0
    if action == "status":
        if args.id is None:
            rows = _api(args.url, "/api/v1/rollouts")
            if args.json:
                print(json.dumps(rows, indent=2))
                return 0
            table = [[r.get("id"), r.get("model"), r.get("versions"), r.get("level"), r.get("state"), r.get("stage"),
                      ", ".join(f"{k} {v}" for k, v in (r.get("cohorts") or {}).items() if v) or "-",
                      (r.get("pending_approval") or {}).get("to_stage")] for r in rows]
            print(_table(table, ["id", "model", "versions", "level", "state", "stage", "orders", "awaits"])
                  if table else "no rollouts")
            return 0
        r = _api(args.url, f"/api/v1/rollouts/{quote(args.id, safe='')}")
        if args.json:
            print(json.dumps(r, indent=2))
            return 0
        print(_rollout_line(r))
        print(f"stages: {' -> '.join(r.get('stages') or [])}; bundle {(r.get('bundle') or {}).get('bundle_id')}; "
              f"started by {r.get('started_by')}")
        print(f"gates: {_gates_text(r.get('gates') or [])}")
        if r.get("reason"):
            print(f"planner: {r['reason']}")
        devices = [[a.get("device_id"), a.get("role"), a.get("device_state"), (a.get("reported") or {}).get("role"),
                    (a.get("reported") or {}).get("state"), (a.get("reported") or {}).get("samples"),
                    a.get("serving_version")] for a in r.get("assignment") or []]
        if devices:
            print(_table(devices, ["device", "ordered", "device_state", "reports", "rollout_state", "samples",
                                   "serves"]))
        for ev in (r.get("events") or [])[-10:]:
            when = datetime.fromtimestamp(ev["time_ms"] / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
            print(f"{when}  {ev.get('actor')}: {ev.get('what')} -> {ev.get('state')} at {ev.get('stage')}: "
                  f"{ev.get('why')}")
        return 0
    body: dict[str, Any] = {"by": args.by}
    if getattr(args, "reason", ""):
        body["reason"] = args.reason
    out = _api(args.url, f"/api/v1/rollouts/{quote(args.id, safe='')}/{action}", method="POST", body=body,
               token=args.token)
    print(json.dumps(out, indent=2) if args.json else f"{action}: {_rollout_line(out)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_attach_ages(sys.argv[1:] if argv is None else argv))
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    from edge_runtime.errors import EdgeRuntimeError

    try:
        return {"serve": cmd_serve, "export": cmd_export, "status": cmd_status, "devices": cmd_devices,
                "alerts": cmd_alerts, "rollout": cmd_rollout}[args.command](args)
    except EdgeRuntimeError as e:
        log.error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
