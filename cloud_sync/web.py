"""The dashboard and its JSON API: a Starlette app over a :class:`~cloud_sync.hub.Hub`.

Pages are rendered on the server (Jinja2, autoescaped) so that they show the fleet without JavaScript,
then refresh themselves by polling the JSON API under ``/api/v1/`` (``static/app.js``: no framework, no
CDN; charts by the vendored uPlot). Device ids, event messages and labels come from devices: templates
escape them and the scripts write them with ``textContent`` only. A Content-Security-Policy without
inline scripts backs that up.

Reading needs no login. Every other method changes state and needs ``Authorization: Bearer <token>``.
A server started without a token accepts those only from a loopback client that also names a loopback
host, and from no other origin: that keeps other web sites (cross-site requests, DNS rebinding) from
acting through a browser on the same machine. Behind a reverse proxy on the same machine, give a token:
the proxy's requests come from loopback.

Starlette, uvicorn and Jinja2 (the ``web`` extra) are imported here and nowhere else; :class:`WebServer`
runs the app with uvicorn in a thread, beside the ingest service.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, urlsplit

from edge_runtime import __version__
from edge_runtime.errors import EdgeRuntimeError, MissingExtraError

try:
    import jinja2
    import uvicorn
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import Headers, MutableHeaders
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise MissingExtraError("the dashboard (cloud_sync.web)", "web", e.name or "starlette") from e

__all__ = [
    "ALERT_COLUMNS",
    "API",
    "DEFAULT_POLL_MS",
    "DEVICE_COLUMNS",
    "DRIFT_COLUMNS",
    "EVENT_COLUMNS",
    "MAX_BODY_BYTES",
    "MODEL_COLUMNS",
    "PIPELINE_COLUMNS",
    "REVIEW_COLUMNS",
    "ROLLOUT_ACTIONS",
    "ROLLOUT_COLUMNS",
    "STATIC_DIR",
    "TEMPLATES_DIR",
    "TOKEN_ENV",
    "VERSION_COLUMNS",
    "Column",
    "WebServer",
    "create_app",
    "format_value",
    "is_loopback",
    "lookup",
    "serve_note",
]

STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
TEMPLATES_DIR: Final = Path(__file__).resolve().parent / "templates"
TOKEN_ENV: Final = "CLOUD_SYNC_TOKEN"
DEFAULT_POLL_MS: Final = 5000
MAX_BODY_BYTES: Final = 16 * 1024
API: Final = "/api/v1"

ALERT_STATES: Final = ("firing", "acknowledged", "resolved")
ROLLOUT_ACTIONS: Final = ("approve", "reject", "pause", "resume", "rollback")
REVIEW_STATES: Final = ("pending", "confirmed", "corrected")
_MAX_BY: Final = 128
_MAX_LABEL: Final = 128
_MAX_REASON: Final = 256
_SAFE_METHODS: Final = frozenset(("GET", "HEAD", "OPTIONS"))
DEFAULT_MAX_UPLOAD_MB: Final = 512.0
_NO_TOKEN_HELP: Final = (f"this server runs without a token, so it accepts changes only from this machine "
                         f"(loopback); start it with --token or set {TOKEN_ENV} to allow them from elsewhere")
# Scripts and styles from this server only: device-supplied text can never run as script. uPlot styles
# its elements through the CSSOM, which style-src does not govern.
_SECURITY_HEADERS: Final = (
    ("content-security-policy", "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                                "frame-ancestors 'none'"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
)


# --------------------------------------------------------------------------------------------------
# Table columns: one list per table, rendered by the templates and, from the same attributes, by
# static/app.js when it refreshes the table. ``fmt`` names a formatter that both implement alike.

@dataclass(frozen=True)
class Column:
    key: str          # a dotted path into the row: "p99_ms.worst"
    title: str
    fmt: str = "text"
    hint: str = ""    # the header's tooltip


DEVICE_COLUMNS: Final = (
    Column("id", "Device", "device"),
    Column("state", "State", "state"),
    Column("running", "Model", "models", "model@version running (or installed) on the device"),
    Column("p99_ms", "p99 ms", "num2", "worst pipeline's p99 inference latency"),
    Column("throughput_per_s", "Inferences/s", "num1"),
    Column("errors", "Errors", "int", "input errors counted since first seen"),
    Column("error_rate", "Error rate", "pct", "over the latest metric interval"),
    Column("cpu_percent", "CPU %", "num1"),
    Column("rss_mb", "RSS MB", "num1"),
    Column("temperature_c", "Temp °C", "num1"),
    Column("drift_score", "Drift", "num2", "latest drift score (1 = alarm level)"),
    Column("alarm", "Drift alarm", "alarm"),
    Column("last_seen_ms", "Last seen (UTC)", "time"),
)
MODEL_COLUMNS: Final = (
    Column("model", "Model"),
    Column("version", "Version"),
    Column("devices", "Devices", "int"),
    Column("devices_online", "Online", "int"),
    Column("inputs", "Inputs", "int"),
    Column("errors", "Errors", "int"),
    Column("error_rate", "Error rate", "pct"),
    Column("low_confidence_rate", "Low confidence", "pct"),
    Column("p99_ms.worst", "p99 ms worst", "num2", "worst p99 over online devices"),
    Column("p99_ms.median", "p99 ms median", "num2", "median p99 over online devices"),
    Column("accuracy.accuracy", "Accuracy", "pct", "from reviewed labels"),
    Column("accuracy.n", "Labels", "int"),
    Column("reported_accuracy", "Reported acc.", "pct", "as the devices report it"),
    Column("reference_accuracy", "Reference acc.", "pct", "at build time"),
    Column("drift_score", "Drift", "num2"),
    Column("drift_alarms", "Drift alarms", "int", "devices with an open drift alarm"),
)
DRIFT_COLUMNS: Final = (
    Column("model", "Model"),
    Column("version", "Version"),
    Column("score", "Fleet score", "num2", "highest latest score over the version's devices"),
    Column("devices", "Devices", "int"),
    Column("alarm_devices", "Devices in alarm", "list"),
    Column("summaries", "Summaries", "int"),
    Column("merged.n", "Samples", "int"),
    Column("merged.psi_max", "PSI max", "num2"),
    Column("merged.ks_max", "KS max", "num2"),
)
ALERT_COLUMNS: Final = (
    Column("started_ms", "Started (UTC)", "time"),
    Column("state", "State", "state"),
    Column("severity", "Severity", "severity"),
    Column("rule", "Rule"),
    Column("subject", "Subject", "subject"),
    Column("message", "Message"),
    Column("acked_by", "Acknowledged by"),
    Column("resolved_ms", "Resolved (UTC)", "time"),
    Column("id", "", "ack"),
)
REVIEW_COLUMNS: Final = (
    Column("created_ms", "Queued (UTC)", "time"),
    Column("device_id", "Device", "device"),
    Column("model", "Model"),
    Column("payload.prediction_id", "Prediction"),
    Column("payload.label", "Predicted", "json"),
    Column("payload.score", "Score", "num2"),
    Column("payload.reason", "Why"),
    Column("payload.input.shape", "Input", "json", "shape of the input the device sent (only when configured)"),
    Column("state", "State", "state"),
    Column("label", "Label", "json"),
    Column("reviewed_by", "Reviewed by"),
    Column("id", "", "review"),
)
VERSION_COLUMNS: Final = (
    Column("model", "Model"),
    Column("version", "Version"),
    Column("inputs", "Inputs", "int"),
    Column("predictions", "Predictions", "int"),
    Column("errors", "Errors", "int"),
    Column("low_confidence_records", "Low confidence", "int"),
    Column("labels.n", "Labels", "int"),
    Column("labels.accuracy", "Accuracy", "pct"),
    Column("drift.score", "Drift", "num2"),
    Column("alarm", "Drift alarm", "alarm"),
)
PIPELINE_COLUMNS: Final = (
    Column("name", "Pipeline"),
    Column("model_version", "Version"),
    Column("p50_ms", "p50 ms", "num2"),
    Column("p99_ms", "p99 ms", "num2"),
    Column("throughput_per_s", "Inferences/s", "num1"),
    Column("error_rate", "Error rate", "pct"),
    Column("low_confidence_rate", "Low confidence", "pct"),
    Column("accuracy", "Reported acc.", "pct"),
    Column("time_ms", "Snapshot (UTC)", "time"),
)
ROLLOUT_COLUMNS: Final = (
    Column("id", "Rollout"),
    Column("model", "Model"),
    Column("versions", "Versions", "text", "the version devices run -> the candidate"),
    Column("level", "Level", "int", "automation level: 1 human-led ... 5 machine-controlled"),
    Column("state", "State", "state"),
    Column("stage", "Stage"),
    Column("cohorts", "Orders", "cohorts", "devices ordered into each role"),
    Column("gates", "Gates", "gates", "the latest gate results: value, limit, verdict"),
    Column("pending_approval.to_stage", "Awaits approval of", "text",
           "approve to enter this stage, reject to roll back"),
    Column("reason", "Planner", "text", "what the planner said last"),
    Column("updated_ms", "Changed (UTC)", "time"),
    Column("id", "", "approval"),
)
EVENT_COLUMNS: Final = (
    Column("time_ms", "Time (UTC)", "time"),
    Column("severity", "Severity", "severity"),
    Column("name", "Event"),
    Column("message", "Message"),
    Column("ref", "Ref"),
)

_EMPTY: Final = "\u2013"  # an en dash: no value
# Device metrics: an alert on one of these has a device id as its subject (rules.DEVICE_METRICS).
_DEVICE_METRICS: Final = frozenset(("p99_latency_ms", "error_rate", "offline_minutes", "low_confidence_rate",
                                    "cpu_percent", "temperature_c"))


def lookup(row: Any, key: str) -> Any:
    """The value at a dotted path, or None where any step is missing."""
    v = row
    for part in key.split("."):
        if not isinstance(v, Mapping):
            return None
        v = v.get(part)
    return v


def _finite(v: Any) -> bool:
    return (type(v) is int or type(v) is float) and math.isfinite(v)


def _short(v: Any) -> str:
    """A gate value: at most three decimals, no trailing zeros (app.js: short())."""
    if not _finite(v):
        return "?" if v is None else str(v)
    return f"{v:.3f}".rstrip("0").rstrip(".")


def format_value(fmt: str, value: Any, row: Mapping[str, Any] | None = None) -> str:
    """A cell's text as static/app.js writes it (``fmt`` of a :class:`Column`)."""
    if fmt == "models":
        return _format_models(value, row or {})
    if fmt == "cohorts":
        parts = [f"{k} {v}" for k, v in value.items() if v] if isinstance(value, Mapping) else []
        return ", ".join(parts) if parts else _EMPTY
    if fmt == "gates":
        gates = [g for g in value if isinstance(g, Mapping)] if isinstance(value, list) else []
        return "; ".join(f"{g.get('name')} {_short(g.get('value'))} {g.get('op')} {_short(g.get('limit'))}: "
                         f"{g.get('status')}" for g in gates) if gates else _EMPTY
    if fmt == "approval":
        return ""
    if fmt == "alarm":
        return "ALARM" if value else "no" if value is False else _EMPTY
    if value is None or value == "":
        return _EMPTY
    if fmt in ("int", "num1", "num2", "pct") and not _finite(value):
        return str(value)
    if fmt == "int":
        return f"{round(value):,}"
    if fmt == "num1":
        return f"{value:.1f}"
    if fmt == "num2":
        return f"{value:.2f}"
    if fmt == "pct":
        return f"{value * 100:.1f}%"
    if fmt == "time":
        if not _finite(value):
            return str(value)
        return datetime.fromtimestamp(value / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
    if fmt == "list":
        return ", ".join(str(v) for v in value) if isinstance(value, list) and value else _EMPTY
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _format_models(value: Any, row: Mapping[str, Any]) -> str:
    running = value if isinstance(value, list) else []
    names = [f"{m.get('model')}@{m.get('version')}" for m in running if isinstance(m, Mapping)]
    if not names:   # nothing serving: what the device says it has installed
        names = [f"{m.get('name')}@{m.get('version')}" for m in row.get("models") or () if isinstance(m, Mapping)]
    return ", ".join(names) if names else _EMPTY


def _rows(data: Any) -> list[dict[str, Any]]:
    """A table's rows: a list of objects, or an object of objects keyed by name."""
    if isinstance(data, Mapping):
        return [{"name": k, **v} for k, v in data.items() if isinstance(v, Mapping)]
    return [r for r in data or () if isinstance(r, Mapping)]


# --------------------------------------------------------------------------------------------------
# Who may change state.

def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (an address, or a Host header's name) is this machine."""
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return bool(addr.is_loopback or (mapped is not None and mapped.is_loopback))


def _host_name(authority: str) -> str:
    """The host of a ``Host`` header value (without its port)."""
    return urlsplit(f"//{authority}").hostname or ""


def _refuse(status: int, error: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "status": status, "message": message}, status_code=status,
                        headers=dict(headers or {}))


class _Guard:
    """Checks every state-changing request before it is routed (see the module docstring)."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token.encode() if token else None

    def check(self, scope: Scope) -> JSONResponse | None:
        headers = Headers(scope=scope)
        if self.token is not None:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not given.strip():
                return _refuse(401, "unauthorized", "this request changes state: send 'Authorization: Bearer "
                               "<token>' (the dashboard asks for the token once)",
                               {"www-authenticate": 'Bearer realm="cloud-sync"'})
            if not hmac.compare_digest(given.strip().encode(), self.token):
                return _refuse(403, "forbidden", "the token is not this server's token")
            return None
        client = scope.get("client")
        host = headers.get("host", "")
        if client is None or not is_loopback(client[0]) or not is_loopback(_host_name(host)):
            return _refuse(403, "forbidden", _NO_TOKEN_HELP)
        origin = headers.get("origin")
        if origin is not None and (urlsplit(origin).netloc.lower() != host.lower()):
            return _refuse(403, "forbidden", f"a request from origin {origin!r} may not change state here; "
                                             f"{_NO_TOKEN_HELP}")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in _SAFE_METHODS:
            refused = self.check(scope)
            if refused is not None:
                await refused(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _SECURITY_HEADERS:
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


# --------------------------------------------------------------------------------------------------
# Requests.

class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


async def _json_body(request: Request, *, required: bool) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _BadRequest(f"the body is {declared} bytes, at most {MAX_BODY_BYTES} are accepted", 413)
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise _BadRequest(f"the body is {len(body)} bytes, at most {MAX_BODY_BYTES} are accepted", 413)
    if not body.strip():
        if required:
            raise _BadRequest("expected a JSON object body, got an empty body")
        return {}
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise _BadRequest(f"expected Content-Type application/json, got {ctype or 'none'!r}", 415)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise _BadRequest(f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise _BadRequest(f"expected a JSON object body, got {type(data).__name__}")
    return data


def _by(body: Mapping[str, Any]) -> str:
    by = body.get("by", "anonymous")
    if not isinstance(by, str) or not by.strip() or len(by) > _MAX_BY or not by.isprintable():
        raise _BadRequest(f"'by' must name who acts: printable text of 1-{_MAX_BY} characters, got {by!r:.80}")
    return by.strip()


def _label(body: Mapping[str, Any]) -> int | str:
    if "label" not in body:
        raise _BadRequest("missing 'label': the confirmed or corrected label (an integer or a string)")
    label = body["label"]
    if type(label) is int or (isinstance(label, str) and 0 < len(label) <= _MAX_LABEL and label.isprintable()):
        return label
    raise _BadRequest(f"'label' must be an integer or printable text of 1-{_MAX_LABEL} characters, "
                      f"got {type(label).__name__} {label!r:.80}")


def _reason(body: Mapping[str, Any], *, required: bool) -> str:
    reason = body.get("reason", "")
    if not isinstance(reason, str) or len(reason) > _MAX_REASON or not (reason.isprintable() or not reason):
        raise _BadRequest(f"'reason' must be printable text of at most {_MAX_REASON} characters, got {reason!r:.80}")
    if required and not reason.strip():
        raise _BadRequest("missing 'reason': say why (it goes into the rollout's log)")
    return reason.strip()


def _state_param(request: Request, allowed: Sequence[str], default: str | None) -> str | None:
    state = request.query_params.get("state") or default
    if state is not None and state != "all" and state not in allowed:
        raise _BadRequest(f"state must be one of {', '.join(allowed)} or all, got {state!r:.40}")
    return None if state == "all" else state


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        v = lo - 1
    if not lo <= v <= hi:
        raise _BadRequest(f"{name} must be an integer in [{lo}, {hi}], got {raw!r:.40}")
    return v


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status, headers={"cache-control": "no-store"})


# --------------------------------------------------------------------------------------------------
# The app.

def create_app(hub: Any, *, token: str | None, static_dir: str | Path = STATIC_DIR,
               templates_dir: str | Path = TEMPLATES_DIR, poll_ms: int = DEFAULT_POLL_MS,
               max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB) -> Starlette:
    """The dashboard and JSON API over ``hub`` (a :class:`cloud_sync.hub.Hub`), as an ASGI app.

    ``token``: what ``Authorization: Bearer`` must carry on state-changing requests; None accepts them
    from loopback clients only. ``poll_ms``: how often pages refresh from the API."""
    if token is not None and not token.strip():
        raise EdgeRuntimeError("the dashboard token is empty: give a token, or none for loopback-only changes")
    if poll_ms < 200:
        raise ValueError(f"poll_ms must be >= 200, got {poll_ms}")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates_dir)), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters["fmt"] = lambda value, fmt, row=None: format_value(fmt, value, row)
    # JSON as plain text, so that autoescape quotes it for the attribute it goes into (Jinja's tojson
    # is marked safe and leaves double quotes as they are).
    env.filters["as_json"] = lambda value: json.dumps(value, ensure_ascii=False)
    env.globals.update(lookup=lookup, version=__version__, poll_ms=poll_ms, device_metrics=_DEVICE_METRICS,
                       token_required=token is not None)

    def page(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        context.setdefault("nav", "")
        html = env.get_template(name).render(request=request, root=root, api=root + API, **context)
        return HTMLResponse(html, status_code=status_code, headers={"cache-control": "no-store"})

    def api_error(request: Request, status: int, error: str, message: str,
                  headers: Mapping[str, str] | None = None) -> Response:
        path = request.url.path.removeprefix(request.scope.get("root_path", ""))
        if path.startswith(API + "/") or path == "/healthz":
            return _refuse(status, error, message, headers)
        return page(request, "error.html", status, title=str(status), status=status, message=message)

    # -- pages ------------------------------------------------------------------------------------------

    def fleet_page(request: Request) -> Response:
        return page(request, "fleet.html", title="Fleet", nav="fleet", snap=hub.snapshot(), devices=hub.devices(),
                    device_columns=DEVICE_COLUMNS, model_columns=MODEL_COLUMNS, drift_columns=DRIFT_COLUMNS)

    def device_page(request: Request) -> Response:
        device_id = request.path_params["device_id"]
        dev = hub.device(device_id)
        if dev is None:
            return api_error(request, 404, "not_found", f"no device {device_id!r}")
        return page(request, "device.html", title=device_id, nav="fleet", dev=dev, device_id=device_id,
                    src=f"devices/{quote(device_id, safe='')}",
                    version_columns=VERSION_COLUMNS, pipeline_columns=PIPELINE_COLUMNS, event_columns=EVENT_COLUMNS,
                    pipelines=_rows(dev.get("pipelines")), events=list(reversed(dev.get("events") or [])))

    def alerts_page(request: Request) -> Response:
        state = _state_param(request, ALERT_STATES, None)
        source = "alerts" + (f"?state={state}" if state else "")
        return page(request, "alerts.html", title="Alerts", nav="alerts", alerts=hub.alert_list(state)[::-1],
                    state=state or "all", states=("all", *ALERT_STATES), source=source, columns=ALERT_COLUMNS)

    def review_page(request: Request) -> Response:
        state = _state_param(request, REVIEW_STATES, "pending")
        limit = _int_param(request, "limit", 100, 1, 1000)
        items = hub.review_items(state, limit) if state else _all_reviews(limit)
        source = f"review?state={state or 'all'}&limit={limit}"
        return page(request, "review.html", title="Review", nav="review", items=items, state=state or "all",
                    states=("all", *REVIEW_STATES), source=source, columns=REVIEW_COLUMNS)

    def rollouts_page(request: Request) -> Response:
        return page(request, "rollouts.html", title="Rollouts", nav="rollouts", rollouts=hub.rollouts(),
                    columns=ROLLOUT_COLUMNS)

    def _all_reviews(limit: int) -> list[dict[str, Any]]:
        items = [i for s in REVIEW_STATES for i in hub.review_items(s, limit)]
        items.sort(key=lambda i: (i.get("created_ms") or 0, str(i.get("id"))))
        return items[:limit]

    # -- API --------------------------------------------------------------------------------------------

    def healthz(request: Request) -> Response:
        return _json({"status": "ok", "time_ms": hub.now_ms(), "version": __version__})

    def api_fleet(request: Request) -> Response:
        return _json(hub.snapshot())

    def api_devices(request: Request) -> Response:
        return _json(hub.devices())

    def _device_or_404(request: Request) -> dict[str, Any]:
        device_id = request.path_params["device_id"]
        dev = hub.device(device_id)
        if dev is None:
            raise HTTPException(404, f"no device {device_id!r}")
        return dev

    def api_device(request: Request) -> Response:
        return _json(_device_or_404(request))

    def api_series(request: Request) -> Response:
        dev = _device_or_404(request)
        since = _int_param(request, "since", 0, 0, 2**63 - 1)
        series = {name: [pt for pt in points if pt[0] >= since] for name, points in (dev.get("series") or {}).items()}
        return _json({"device_id": dev.get("id", request.path_params["device_id"]), "series": series})

    def api_models(request: Request) -> Response:
        return _json(hub.models())

    def api_drift(request: Request) -> Response:
        return _json(hub.drift())

    def api_alerts(request: Request) -> Response:
        return _json(hub.alert_list(_state_param(request, ALERT_STATES, None)))

    async def api_ack(request: Request) -> Response:
        body = await _json_body(request, required=False)
        by = _by(body)
        alert_id = request.path_params["alert_id"]
        try:
            alert = await run_in_threadpool(hub.ack_alert, alert_id, by)
        except KeyError:
            raise HTTPException(404, f"no alert {alert_id!r}") from None
        except ValueError as e:
            return _refuse(409, "conflict", str(e))
        return _json(alert)

    def api_review(request: Request) -> Response:
        state = _state_param(request, REVIEW_STATES, "pending")
        limit = _int_param(request, "limit", 100, 1, 1000)
        return _json(hub.review_items(state, limit) if state else _all_reviews(limit))

    async def api_review_resolve(request: Request) -> Response:
        body = await _json_body(request, required=True)
        label, by = _label(body), _by(body)
        item_id = request.path_params["item_id"]
        try:
            item = await run_in_threadpool(hub.review_resolve, item_id, label, by)
        except KeyError:
            raise HTTPException(404, f"no review item {item_id!r}") from None
        except ValueError as e:
            return _refuse(409, "conflict", str(e))
        return _json(item)

    def api_rollouts(request: Request) -> Response:
        return _json(hub.rollouts())

    def api_rollout(request: Request) -> Response:
        rollout_id = request.path_params["rollout_id"]
        try:
            return _json(hub.rollouts_service.detail(rollout_id))
        except KeyError:
            raise HTTPException(404, f"no rollout {rollout_id!r}") from None

    def _rollout_refusal(e: Exception) -> Response:
        from cloud_sync import planner
        from cloud_sync.rollouts import BundlePublishError, RolloutConflict

        if isinstance(e, BundlePublishError):
            return _refuse(503, "unavailable", str(e))
        if isinstance(e, RolloutConflict | planner.IllegalAction):
            return _refuse(409, "conflict", str(e))
        return _refuse(400, "bad_request", str(e))

    async def api_rollout_start(request: Request) -> Response:
        from cloud_sync import planner

        body = await _json_body(request, required=True)
        by = _by(body)
        text, bundle = body.get("plan"), body.get("bundle")
        if not isinstance(text, str) or not text.strip():
            raise _BadRequest("missing 'plan': the plan's TOML text")
        if not isinstance(bundle, str) or not bundle.strip():
            raise _BadRequest("missing 'bundle': the path of the bundle (.tar or directory) on this server")
        try:
            plan = planner.parse_plan(text, str(body.get("plan_name") or "<plan>")[:200])
            detail = await run_in_threadpool(hub.rollouts_service.start, plan, bundle, by=by)
        except EdgeRuntimeError as e:
            return _rollout_refusal(e)
        return _json(detail, 201)

    async def api_bundle_upload(request: Request) -> Response:
        """A bundle's .tar as the request body, kept in the bundles directory for a rollout to name
        (``{"bundle": <path on this server>}``): so that `cloud-sync rollout start` works from
        another machine. Verified when a rollout starts from it, like any bundle."""
        import hashlib
        import os
        import tarfile
        import tempfile

        limit = int(max_upload_mb * 1024 * 1024)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return _refuse(413, "too_large", f"the bundle is {int(length)} bytes, this server takes at most "
                                             f"{limit} (--max-upload-mb)")
        folder = Path(hub.rollouts_service.bundles_dir) / "uploads"
        folder.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=".upload-", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        return _refuse(413, "too_large", f"the bundle is over {limit} bytes (--max-upload-mb)")
                    digest.update(chunk)
                    f.write(chunk)
            if size == 0:
                return _refuse(400, "bad_request", "the body is empty: send the bundle's .tar")
            try:
                with tarfile.open(tmp) as tar:
                    names = {m.name.lstrip("./") for m in tar.getmembers()}
            except (tarfile.TarError, OSError) as e:
                return _refuse(400, "bad_request", f"the body is not a tar archive: {e}")
            if "manifest.json" not in names:
                return _refuse(400, "bad_request", "the archive has no manifest.json: not a model bundle")
            sha = digest.hexdigest()
            final = folder / f"upload-{sha[:20]}.tar"
            tmp.replace(final)
        finally:
            tmp.unlink(missing_ok=True)
        return _json({"bundle": str(final), "sha256": sha, "size": size}, 201)

    async def api_rollout_action(request: Request) -> Response:
        body = await _json_body(request, required=False)
        by = _by(body)
        rollout_id, action = request.path_params["rollout_id"], request.path_params["action"]
        if action not in ROLLOUT_ACTIONS:
            raise HTTPException(404, f"no rollout action {action!r} (actions: {', '.join(ROLLOUT_ACTIONS)})")
        svc = hub.rollouts_service
        calls = {"approve": lambda: svc.approve(rollout_id, by),
                 "reject": lambda: svc.reject(rollout_id, by, _reason(body, required=False)),
                 "pause": lambda: svc.pause(rollout_id, by, _reason(body, required=False)),
                 "resume": lambda: svc.resume(rollout_id, by),
                 "rollback": lambda: svc.rollback(rollout_id, by, _reason(body, required=True))}
        if action == "rollback":
            _reason(body, required=True)
        try:
            detail = await run_in_threadpool(calls[action])
        except KeyError:
            raise HTTPException(404, f"no rollout {rollout_id!r}") from None
        except EdgeRuntimeError as e:
            return _rollout_refusal(e)
        return _json(detail)

    # -- errors -----------------------------------------------------------------------------------------

    _ERRORS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "too_large", 415: "unsupported_media_type"}

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)  # what Starlette routes here
        code = exc.status_code
        message = exc.detail if code != 404 or exc.detail != "Not Found" else f"no such page: {request.url.path}"
        return api_error(request, code, _ERRORS.get(code, "error"), str(message), exc.headers)

    async def on_bad_request(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, _BadRequest)
        return api_error(request, exc.status, _ERRORS.get(exc.status, "bad_request"), str(exc))

    async def on_crash(request: Request, exc: Exception) -> Response:
        # Starlette re-raises after this answer, and uvicorn logs the traceback.
        return api_error(request, 500, "internal_error", f"the server failed: {type(exc).__name__}")

    routes = [
        Route("/", fleet_page, name="fleet"),
        Route("/devices/{device_id}", device_page, name="device"),
        Route("/alerts", alerts_page, name="alerts"),
        Route("/review", review_page, name="review"),
        Route("/rollouts", rollouts_page, name="rollouts"),
        Route("/healthz", healthz),
        Route(f"{API}/fleet", api_fleet),
        Route(f"{API}/devices", api_devices),
        Route(f"{API}/devices/{{device_id}}", api_device),
        Route(f"{API}/devices/{{device_id}}/series", api_series),
        Route(f"{API}/models", api_models),
        Route(f"{API}/drift", api_drift),
        Route(f"{API}/alerts", api_alerts),
        Route(f"{API}/alerts/{{alert_id}}/ack", api_ack, methods=["POST"]),
        Route(f"{API}/bundles", api_bundle_upload, methods=["POST"]),
        Route(f"{API}/review", api_review),
        Route(f"{API}/review/{{item_id}}", api_review_resolve, methods=["POST"]),
        Route(f"{API}/rollouts", api_rollouts),
        Route(f"{API}/rollouts", api_rollout_start, methods=["POST"]),
        Route(f"{API}/rollouts/{{rollout_id}}", api_rollout),
        Route(f"{API}/rollouts/{{rollout_id}}/{{action}}", api_rollout_action, methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(static_dir)), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: on_http_error, _BadRequest: on_bad_request,
                                                       Exception: on_crash})
    app.add_middleware(_Guard, token=token)           # type: ignore[arg-type]
    app.add_middleware(_SecurityHeaders)              # type: ignore[arg-type]
    app.state.hub = hub
    return app


# --------------------------------------------------------------------------------------------------
# Serving.

class WebServer:
    """uvicorn serving an app on ``host:port`` in a thread of its own (``port=0``: a free port, see
    :attr:`port` once started). Signals stay with the caller's main loop."""

    def __init__(self, app: ASGIApp, *, host: str = "127.0.0.1", port: int = 8080, log_level: str = "warning",
                 access_log: bool = False) -> None:
        self.host = host
        self.config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                                     lifespan="off", server_header=False)
        self.server = uvicorn.Server(self.config)
        self._thread: threading.Thread | None = None
        self.port = port

    def start(self, timeout_s: float = 10.0) -> WebServer:
        if self._thread is not None:
            raise EdgeRuntimeError("the dashboard server is already started")
        self._thread = threading.Thread(target=self._run, name="dashboard", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive():
                raise EdgeRuntimeError(f"the dashboard could not listen on {self.host}:{self.config.port} "
                                       "(in use, or not an address of this machine? uvicorn logged why)")
            if time.monotonic() > deadline:
                self.stop()
                raise EdgeRuntimeError(f"the dashboard did not start on {self.host}:{self.config.port} "
                                       f"within {timeout_s:g} s")
            time.sleep(0.02)
        sockets = [s for srv in self.server.servers for s in srv.sockets]
        if sockets:
            self.port = sockets[0].getsockname()[1]
        return self

    def _run(self) -> None:
        # uvicorn exits when it cannot bind, after logging why; start() reports it.
        with contextlib.suppress(SystemExit):
            self.server.run()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout_s: float = 5.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)


def serve_note(host: str, token: str | None) -> str | None:
    """A warning for the log when the dashboard is reachable from elsewhere but refuses changes there."""
    if token is None and not is_loopback(host):
        return (f"dashboard on {host} without a token: pages are readable from the network, changes are "
                f"accepted from this machine only (set --token or {TOKEN_ENV})")
    return None
