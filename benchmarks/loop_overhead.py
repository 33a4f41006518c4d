"""Agent-loop overhead, tail latency, idle CPU and RSS of edge-runtime, against bare onnxruntime.

What it does (see benchmarks/README.md):

1. builds the sample models into --models-dir if they are missing (models/build_all.py);
2. for each case (digits_mlp batch 1, digits_mlp batch 32, cnn batch 1) runs
   ``edge-runtime bench --json`` --repeats times, each in a fresh process: bare ``session.run`` and
   the agent's ``Pipeline.step`` are measured on the same inputs in that same process and run, so every
   overhead and ratio compares figures taken side by side; the medians over repeats are reported;
3. starts ``edge-runtime run --source stdin`` on the tiny model, never writes to it, and reads the
   idle agent's CPU time and RSS from /proc; then stops it with SIGTERM and checks its report;
4. prints a table and one pass/fail line per target (information only), and writes every raw
   result with the machine's details to --out.

Exit status: 0 when every step ran, whatever the targets say; 1 when a step failed.

Usage: python benchmarks/loop_overhead.py [--quick] [--models-dir DIR] [--out FILE.json]
                                          [--repeats N] [--seconds S] [--idle-seconds S]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _shared

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = REPO / "benchmarks" / "out" / "models"
DEFAULT_OUT = REPO / "benchmarks" / "out" / "loop_overhead.json"
CLI = [sys.executable, "-m", "edge_runtime.cli"]

# (case name, model file, batch)
CASES = [
    ("digits_mlp b1", "digits_mlp.onnx", 1),
    ("digits_mlp b32", "digits_mlp.onnx", 32),
    ("cnn b1", "cnn.onnx", 1),
]
TINY = "digits_mlp.onnx"

# Targets (information only).
MAX_OVERHEAD_US_TINY = 10.0     # median loop overhead, digits_mlp batch 1
MAX_OVERHEAD_PCT_CNN = 3.0      # median loop overhead on the ~2 ms cnn, percent of bare
MAX_INFER_P99_OVER_P50 = 1.5    # agent infer stage p99/p50
MAX_IDLE_CPU_PCT = 1.0          # idle agent, percent of one core
MAX_RSS_MB = 100.0              # agent with the tiny model


def log(msg: str) -> None:
    print(f"[loop_overhead] {msg}", file=sys.stderr, flush=True)


class StepError(RuntimeError):
    """A benchmark step failed (as opposed to a target not being met)."""


# -- models -----------------------------------------------------------------------------------------


def ensure_models(models_dir: Path) -> dict[str, Any]:
    try:
        return _shared.ensure_models(models_dir, {m for _, m, _ in CASES} | {TINY}, log)
    except RuntimeError as e:
        raise StepError(str(e)) from None


# -- bench cases ------------------------------------------------------------------------------------


def run_bench_once(model: Path, batch: int, seconds: float, profile: str | None) -> dict[str, Any]:
    cmd = [*CLI, "bench", "--model", str(model), "--batch", str(batch), "--seconds", str(seconds),
           "--json", "--log-level", "warning"]
    if profile:
        cmd += ["--profile", profile]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=seconds + 120)
    if proc.returncode != 0:
        raise StepError(f"{shlex.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    try:
        result = json.loads(proc.stdout)
    except ValueError as e:
        raise StepError(f"{shlex.join(cmd)} printed no JSON: {e}; stdout {proc.stdout[:500]!r}") from None
    result["command"] = shlex.join(cmd)
    return result


def overhead_pct(r: dict[str, Any]) -> float | None:
    return 100.0 * r["overhead_us"] / r["bare_us"] if r.get("bare_us") else None


# Figures summarised per case: name -> how to read it from one bench result.
FIGURES: dict[str, Any] = {
    "bare_us": lambda r: r["bare_us"],
    "agent_us": lambda r: r["agent_us"],
    "overhead_us": lambda r: r["overhead_us"],
    "ratio": lambda r: r["ratio"],
    "overhead_pct": overhead_pct,
    "bare_p99_us": lambda r: r["bare"]["p99_us"],
    "agent_p99_us": lambda r: r["agent"]["p99_us"],
    "agent_infer_p50_us": lambda r: r["agent_stages_us"]["infer"]["p50"],
    "agent_infer_p99_us": lambda r: r["agent_stages_us"]["infer"]["p99"],
    "agent_read_p50_us": lambda r: r["agent_stages_us"]["read"]["p50"],
    "agent_preprocess_p50_us": lambda r: r["agent_stages_us"]["preprocess"]["p50"],
    "agent_postprocess_p50_us": lambda r: r["agent_stages_us"]["postprocess"]["p50"],
    "agent_infer_p99_over_p50": lambda r: r["agent_infer_p99_over_p50"],
    "bare_p99_over_p50": lambda r: r["bare_p99_over_p50"],
    "bare_throughput_per_s": lambda r: r["bare"]["throughput_per_s"],
    "agent_throughput_per_s": lambda r: r["agent"]["throughput_per_s"],
    "rss_mb": lambda r: r["rss_mb"],
    "peak_rss_mb": lambda r: r["peak_rss_mb"],
}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median (and min/max, to show the spread) of each figure over the repeats."""
    out: dict[str, Any] = {}
    for name, get in FIGURES.items():
        vals = [v for v in (get(r) for r in runs) if v is not None]
        if not vals:
            out[name] = None
            continue
        out[name] = {"median": round(float(np.median(vals)), 4), "min": round(min(vals), 4),
                     "max": round(max(vals), 4), "values": [round(v, 4) for v in vals]}
    return out


def run_cases(models_dir: Path, repeats: int, seconds: float, profile: str | None,
              errors: list[str]) -> list[dict[str, Any]]:
    """Every case in turn; a case that fails is recorded in ``errors`` and the others still run."""
    cases = []
    for name, model, batch in CASES:
        runs = []
        try:
            for i in range(repeats):
                log(f"bench {name}: repeat {i + 1}/{repeats} ({seconds:g} s)")
                r = run_bench_once(models_dir / model, batch, seconds, profile)
                if r.get("agent_errors"):
                    raise StepError(f"the agent loop counted {r['agent_errors']} errors")
                log(f"bench {name}: bare {r['bare_us']:.2f} us, agent {r['agent_us']:.2f} us, "
                    f"overhead {r['overhead_us']:+.2f} us, infer p99/p50 {r['agent_infer_p99_over_p50']}")
                runs.append(r)
        except (StepError, subprocess.TimeoutExpired) as e:
            errors.append(f"bench {name}: {e}")
            continue
        cases.append({"case": name, "model": model, "batch": batch, "summary": summarise(runs), "runs": runs})
    return cases


# -- idle agent -------------------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text.rpartition(")")[2].split()  # the command name may hold spaces; fields after it
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of stat(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def proc_status(pid: int, field: str) -> float | None:
    """A number from /proc/<pid>/status (kB for the Vm* fields)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return None


def proc_status_mb(pid: int, field: str) -> float | None:
    kb = proc_status(pid, field)
    return None if kb is None else round(kb / 1024.0, 1)


def measure_idle(models_dir: Path, idle_s: float, profile: str | None, load_timeout_s: float = 60.0
                 ) -> dict[str, Any]:
    if not Path("/proc/self/stat").exists():
        raise StepError("idle CPU is read from /proc, which this system does not have")
    with tempfile.TemporaryDirectory(prefix="loop_overhead_") as tmp:
        report_path = Path(tmp) / "idle.report.json"
        cmd = [*CLI, "run", "--model", str(models_dir / TINY), "--source", "stdin",
               "--report-json", str(report_path), "--status-interval", "0", "--log-level", "info"]
        if profile:
            cmd += ["--profile", profile]
        log(f"idle agent: {shlex.join(cmd)}")
        # stdin is a pipe this script holds open and never writes to: the agent waits for input.
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        loaded = threading.Event()

        def drain_stderr() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                lines.append(line.rstrip("\n"))
                if " loaded" in line:
                    loaded.set()

        reader = threading.Thread(target=drain_stderr, daemon=True)
        reader.start()
        try:
            t_start = time.monotonic()
            while not loaded.wait(0.1):
                if proc.poll() is not None:
                    raise StepError(f"idle agent exited {proc.returncode} before loading: "
                                    + "\n".join(lines[-20:]))
                if time.monotonic() - t_start > load_timeout_s:
                    raise StepError(f"idle agent did not log 'loaded' within {load_timeout_s:.0f} s")
            load_s = time.monotonic() - t_start
            time.sleep(1.0)  # let the pipeline thread start and settle into its wait
            if proc.poll() is not None:
                raise StepError(f"idle agent exited {proc.returncode} while idle: " + "\n".join(lines[-20:]))
            log(f"idle agent loaded in {load_s:.1f} s; measuring {idle_s:g} s of idle CPU")
            cpu0, t0 = proc_cpu_seconds(proc.pid), time.monotonic()
            time.sleep(idle_s)
            cpu1, t1 = proc_cpu_seconds(proc.pid), time.monotonic()
            rss = proc_status_mb(proc.pid, "VmRSS")
            peak = proc_status_mb(proc.pid, "VmHWM")
            threads = proc_status(proc.pid, "Threads")
            cpu_pct = 100.0 * (cpu1 - cpu0) / (t1 - t0)
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                raise StepError("idle agent did not stop within 30 s of SIGTERM") from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdin is not None:
                proc.stdin.close()
            if proc.stdout is not None:
                proc.stdout.close()
            reader.join(timeout=5)
        if not report_path.is_file():
            raise StepError(f"idle agent exited {rc} without writing {report_path.name}: "
                            + "\n".join(lines[-20:]))
        report = json.loads(report_path.read_text())
    return {
        "command": shlex.join(cmd),
        "load_s": round(load_s, 2),
        "idle_window_s": round(t1 - t0, 3),
        "cpu_seconds": round(cpu1 - cpu0, 4),
        "clock_ticks_per_s": os.sysconf("SC_CLK_TCK"),
        # One clock tick over the window: the smallest non-zero CPU figure this can read.
        "cpu_resolution_percent": round(100.0 / (os.sysconf("SC_CLK_TCK") * (t1 - t0)), 3),
        "cpu_percent": round(cpu_pct, 3),
        "rss_mb": rss,
        "peak_rss_mb": peak,
        "threads": int(threads) if threads is not None else None,
        "exit_code": rc,
        "report_written": True,
        "report_stopped_by": report.get("stopped_by"),
        "report": {k: report.get(k) for k in ("duration_s", "cpu_percent", "rss_mb", "peak_rss_mb")},
    }


# -- targets and output -----------------------------------------------------------------------------


def _med(cases: list[dict[str, Any]], case: str, figure: str) -> float | None:
    for c in cases:
        if c["case"] == case:
            f = c["summary"].get(figure)
            return f["median"] if f else None
    return None


def evaluate_targets(cases: list[dict[str, Any]], idle: dict[str, Any] | None) -> list[dict[str, Any]]:
    targets = []

    def add(name: str, value: Any, limit: float, ok: bool | None, detail: str) -> None:
        targets.append({"target": name, "value": value, "limit": limit, "met": ok, "detail": detail})

    v = _med(cases, "digits_mlp b1", "overhead_us")
    add("loop overhead, digits_mlp batch 1 (median us)", v, MAX_OVERHEAD_US_TINY,
        None if v is None else v <= MAX_OVERHEAD_US_TINY, f"{_fmt(v)} us <= {MAX_OVERHEAD_US_TINY} us")
    v = _med(cases, "cnn b1", "overhead_pct")
    add("loop overhead, cnn batch 1 (median % of bare)", v, MAX_OVERHEAD_PCT_CNN,
        None if v is None else v <= MAX_OVERHEAD_PCT_CNN,
        f"{_fmt(v)} % <= {MAX_OVERHEAD_PCT_CNN} %")
    per_case = {c["case"]: _med(cases, c["case"], "agent_infer_p99_over_p50") for c in cases}
    vals = [x for x in per_case.values() if x is not None]
    add("agent infer p99/p50 (every case)", per_case, MAX_INFER_P99_OVER_P50,
        None if not vals else max(vals) <= MAX_INFER_P99_OVER_P50,
        (", ".join(f"{k} {_fmt(x)}" for k, x in per_case.items()) or "n/a")
        + f" (each <= {MAX_INFER_P99_OVER_P50})")
    v = idle["cpu_percent"] if idle else None
    add("idle agent CPU (% of one core)", v, MAX_IDLE_CPU_PCT,
        None if v is None else v < MAX_IDLE_CPU_PCT, f"{_fmt(v, '.3f')} % < {MAX_IDLE_CPU_PCT} %")
    # RSS of the agent process with the tiny model: the idle `run` agent's peak (VmHWM), which
    # includes loading; the bench process (which also holds the benchmark's arrays) is shown beside it.
    v = idle["peak_rss_mb"] if idle else None
    bench_rss = _med(cases, "digits_mlp b1", "peak_rss_mb")
    add("agent RSS, digits_mlp (MB, peak of the run agent)", v, MAX_RSS_MB,
        None if v is None else v <= MAX_RSS_MB,
        f"run agent peak {_fmt(v, '.1f')} MB, now {_fmt(idle['rss_mb'] if idle else None, '.1f')} MB; "
        f"bench process peak {_fmt(bench_rss, '.1f')} MB (<= {MAX_RSS_MB} MB)")
    return targets


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def format_table(cases: list[dict[str, Any]], idle: dict[str, Any] | None,
                 targets: list[dict[str, Any]]) -> str:
    cols = [("bare us", "bare_us", ".2f"), ("agent us", "agent_us", ".2f"),
            ("ovh us", "overhead_us", "+.2f"), ("ovh %", "overhead_pct", "+.1f"),
            ("ratio", "ratio", ".3f"), ("agent p99", "agent_p99_us", ".1f"),
            ("inf p99/50", "agent_infer_p99_over_p50", ".2f"), ("bare p99/50", "bare_p99_over_p50", ".2f"),
            ("rss MB", "rss_mb", ".1f")]
    head = f"{'case':16}" + "".join(f"{c[0]:>12}" for c in cols) + f"{'repeats':>9}"
    lines = ["Medians over repeats; bare and agent measured in the same process and run.", "", head]
    for c in cases:
        row = f"{c['case']:16}"
        for _, key, spec in cols:
            f = c["summary"].get(key)
            row += f"{_fmt(f['median'] if f else None, spec):>12}"
        lines.append(row + f"{len(c['runs']):>9}")
    lines += ["", "Agent stage p50 (us), medians over repeats: read (includes input checks at batch > 1), "
                  "preprocess, infer (IOBinding runner), postprocess"]
    for c in cases:
        sm = c["summary"]
        vals = [sm.get(k) for k in ("agent_read_p50_us", "agent_preprocess_p50_us", "agent_infer_p50_us",
                                    "agent_postprocess_p50_us")]
        lines.append(f"  {c['case']:16}" + "".join(f"{_fmt(v['median'] if v else None, '.1f'):>10}"
                                                     for v in vals))
    spread = []
    for c in cases:
        f = c["summary"].get("overhead_us")
        if f:
            spread.append(f"{c['case']} overhead us over repeats: "
                          + ", ".join(f"{v:+.2f}" for v in f["values"]))
    if spread:
        lines += ["", *spread]
    if idle:
        lines += ["", f"idle agent ({TINY}, stdin source, {idle['idle_window_s']:.1f} s window): "
                      f"cpu {idle['cpu_percent']:.3f} % of one core (resolution "
                      f"{idle['cpu_resolution_percent']:.2f} %), rss {idle['rss_mb']} MB "
                      f"(peak {idle['peak_rss_mb']} MB), {idle['threads']} threads; "
                      f"SIGTERM -> exit {idle['exit_code']}, report written"]
    lines += ["", "Targets (information only):"]
    for t in targets:
        status = {True: "PASS", False: "FAIL", None: "N/A "}[t["met"]]
        lines.append(f"  {status}  {t['target']}: {t['detail']}")
    return "\n".join(lines)


def _ort_version(cases: list[dict[str, Any]]) -> str | None:
    for c in cases:
        for r in c["runs"]:
            if r.get("onnxruntime"):
                return r["onnxruntime"]
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onnxruntime")
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 repeat of ~1.5 s per case and a 3 s idle window (for CI, < 40 s)")
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS,
                        help=f"sample models, built here if missing (default {DEFAULT_MODELS})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"raw results (default {DEFAULT_OUT})")
    parser.add_argument("--repeats", type=int, help="bench processes per case (default 3; quick 1)")
    parser.add_argument("--seconds", type=float, help="measuring seconds per bench (default 5; quick 1.5)")
    parser.add_argument("--idle-seconds", type=float, help="idle window (default 10; quick 3)")
    parser.add_argument("--profile", help="device profile passed to edge-runtime (default: detected)")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    seconds = args.seconds if args.seconds is not None else (1.5 if args.quick else 5.0)
    idle_s = args.idle_seconds if args.idle_seconds is not None else (3.0 if args.quick else 10.0)
    if repeats < 1 or seconds <= 0 or idle_s <= 0:
        parser.error("--repeats must be >= 1, --seconds and --idle-seconds > 0")
    models_dir = args.models_dir.resolve()

    from edge_runtime.sysinfo import machine_info

    t_start = time.monotonic()
    errors: list[str] = []
    build: dict[str, Any] | None = None
    cases: list[dict[str, Any]] = []
    idle: dict[str, Any] | None = None
    try:
        build = ensure_models(models_dir)
    except (StepError, subprocess.TimeoutExpired) as e:
        errors.append(f"build: {e}")
    if build is not None:
        cases = run_cases(models_dir, repeats, seconds, args.profile, errors)
        try:
            idle = measure_idle(models_dir, idle_s, args.profile)
        except (StepError, OSError, ValueError) as e:
            errors.append(f"idle: {e}")
    targets = evaluate_targets(cases, idle)
    print(format_table(cases, idle, targets))
    for e in errors:
        log(f"FAILED {e}")

    result = {
        "benchmark": "loop_overhead",
        "timestamp_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "settings": {"quick": args.quick, "repeats": repeats, "seconds": seconds, "idle_seconds": idle_s,
                     "profile": args.profile, "models_dir": str(models_dir)},
        "machine": machine_info(),
        "onnxruntime": _ort_version(cases),
        "models": build,
        "cases": cases,
        "idle": idle,
        "targets": targets,
        "errors": errors,
        "elapsed_s": round(time.monotonic() - t_start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {args.out} ({result['elapsed_s']:.1f} s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
