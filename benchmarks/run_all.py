"""Run every benchmark; write results.json, PNG plots and the run_all section of benchmarks/RESULTS.md.

It runs the benchmarks in one go, writes the machine's details and every raw result to one JSON file,
draws the plots, and regenerates the run_all section of benchmarks/RESULTS.md.

Each benchmark runs as its own subprocess (this Python), in turn, with ``--out`` into ``--out-dir``
(default benchmarks/out/run_all/), at its full settings or, with ``--quick``, at the short settings its
smoke test uses. One that fails or passes its timeout is recorded and the others still run.

What it writes:

- ``OUT_DIR/results.json``: ``{machine, command, started_utc, finished_utc, quick, benchmarks: {name: {ok,
  seconds, returncode, timed_out, command, log, error, out: <the benchmark's own JSON>}}, plots, notes}``;
- ``OUT_DIR/NAME.json`` (each benchmark's JSON) and ``OUT_DIR/logs/NAME.log`` (its output);
- ``OUT_DIR/plots/*.png`` (benchmarks/plots.py, matplotlib: the ``bench`` extra), copied to
  ``--plots-dir`` (default benchmarks/plots/ on a full run of every benchmark);
- the section between ``<!-- run_all:begin -->`` and ``<!-- run_all:end -->`` of ``--results-md``
  (default benchmarks/RESULTS.md; inserted after its introduction when absent; the rest of the file is
  kept as it is): machine, command, date, a headline table of each figure next to its baseline from the
  same run, and the plots. A full run of every benchmark writes it unless ``--no-write-results``; a
  ``--quick`` or partial (``--only``/``--skip``) run writes it only with ``--write-results``, so CI changes
  no tracked file.

Exit status: 0 when every benchmark that ran succeeded; 1 when one failed or timed out; 130 on Ctrl-C or
SIGTERM (after stopping the running benchmark and writing what there is).

Usage: python benchmarks/run_all.py [--quick] [--only NAME,...] [--skip NAME,...] [--list] [--out-dir DIR]
                                    [--timeout S] [--results-md PATH] [--write-results | --no-write-results]
                                    [--plots-dir DIR] [--replot]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import plots as plotting  # noqa: E402 - benchmarks/ holds scripts, not a package

DEFAULT_OUT_DIR = HERE / "out" / "run_all"
DEFAULT_MODELS = HERE / "out" / "models"
DEFAULT_RESULTS_MD = HERE / "RESULTS.md"
DEFAULT_PLOTS_DIR = HERE / "plots"
BEGIN = "<!-- run_all:begin -->"
END = "<!-- run_all:end -->"


def log(msg: str) -> None:
    print(f"[run_all {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the benchmarks -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bench:
    """One benchmark script and how run_all calls it. ``quick`` are the settings of its smoke test."""

    name: str
    script: str
    what: str
    full: tuple[str, ...] = ()
    quick: tuple[str, ...] = ()
    models_dir: bool = True          # takes --models-dir
    stdout_json: bool = False        # prints its JSON with --json instead of writing --out
    timeout_full_s: float = 1800.0
    timeout_quick_s: float = 300.0

    @property
    def aliases(self) -> tuple[str, ...]:
        stem = Path(self.script).stem
        return (self.name,) if stem == self.name else (self.name, stem)


# In the order they run: the list first, then the rest. Quick settings: those of tests/test_benchmarks_*.
BENCHMARKS: tuple[Bench, ...] = (
    Bench("loop_overhead", "loop_overhead.py", "agent loop vs bare onnxruntime, idle CPU, RSS",
          quick=("--quick", "--seconds", "0.3", "--idle-seconds", "1"), timeout_quick_s=180),
    Bench("quantize", "quantize_all.py", "every quantized variant against its model's fp32",
          quick=("--seconds", "0.2")),
    Bench("drift", "drift_bench.py", "drift detection delay and false alarms vs river",
          quick=("--quick", "--seeds", "1", "--kswin-seeds", "1", "--null-samples", "20000",
                 "--river-null-samples", "3000"), timeout_quick_s=420),
    Bench("sync", "sync_bench.py", "outbox sync through Mosquitto vs naive delete-on-PUBACK",
          quick=("--quick", "--records", "2000"), models_dir=False, timeout_quick_s=180),
    Bench("fleet", "fleet_sim.py", "N simulated devices into cloud-sync serve vs an echo broker round trip",
          full=("--devices", "100,300,1000"), quick=("--quick",), models_dir=False,
          timeout_full_s=4200, timeout_quick_s=300),
    Bench("soak", "soak.py", "a real agent for minutes with broker restarts and cloud outages",
          full=("--minutes", "10"),
          quick=("--quick", "--minutes", "0.75", "--sample-seconds", "1", "--window-seconds", "5",
                 "--warmup-seconds", "5", "--broker-restart-every", "15", "--cloud-outage-every", "20",
                 "--outage-seconds", "5", "--drain-seconds", "15", "--timeout", "150"),
          timeout_full_s=1500, timeout_quick_s=240),
    Bench("bundle_verify", "bundle_verify.py", "bundle verify vs a bare model load", quick=("--repeats", "2")),
    Bench("bundle_delivery", "bundle_delivery.py", "one bundle to N devices vs to one",
          quick=("--quick", "--devices", "3", "--size-mb", "1"), models_dir=False),
    Bench("hot_swap", "hot_swap.py", "output gap across a hot swap vs the normal gap",
          full=("--json",), quick=("--json", "--swaps", "2", "--hz", "400"), stdout_json=True),
    Bench("drift_in_agent", "drift_in_agent.py", "agent throughput with drift monitoring vs without",
          full=("--json",), quick=("--json", "--repeats", "1", "--rows", "600", "--frames", "12"),
          stdout_json=True),
    Bench("escalation", "escalation_curve.py", "combined accuracy vs escalation rate, device-side cost",
          quick=("--quick", "--seconds", "0.05")),
)


def resolve_names(spec: str | None, benches: Iterable[Bench] = BENCHMARKS) -> list[str]:
    """``"drift,sync_bench"`` -> ``["drift", "sync"]`` (names or script stems); ValueError names the unknown."""
    if not spec:
        return []
    by_alias = {a: b.name for b in benches for a in b.aliases}
    names, unknown = [], []
    for raw in spec.split(","):
        n = raw.strip()
        if not n:
            continue
        if n in by_alias:
            names.append(by_alias[n])
        else:
            unknown.append(n)
    if unknown:
        raise ValueError(f"unknown benchmark {', '.join(map(repr, unknown))}; known: "
                         f"{', '.join(b.name for b in benches)}")
    return names


def select(only: list[str], skip: list[str], benches: Iterable[Bench] = BENCHMARKS) -> list[Bench]:
    return [b for b in benches if (not only or b.name in only) and b.name not in skip]


def settings_args(b: Bench, quick: bool, fleet_devices: str | None = None,
                  soak_minutes: float | None = None) -> list[str]:
    """The benchmark's own settings (no paths): full or quick, with run_all's overrides applied."""
    args = list(b.quick if quick else b.full)
    if b.name == "fleet" and fleet_devices:
        args = _set_option(args, "--devices", fleet_devices)
    if b.name == "soak" and soak_minutes is not None:
        args = _set_option(args, "--minutes", f"{soak_minutes:g}")
    return args


def _set_option(args: list[str], option: str, value: str) -> list[str]:
    if option in args:
        i = args.index(option)
        return [*args[:i + 1], value, *args[i + 2:]]
    return [*args, option, value]


def bench_command(b: Bench, args: list[str], out: Path, models_dir: Path) -> list[str]:
    cmd = [sys.executable, str(HERE / b.script), *args]
    if b.models_dir:
        cmd += ["--models-dir", str(models_dir)]
    if not b.stdout_json:
        cmd += ["--out", str(out)]
    return cmd


def timeout_for(b: Bench, quick: bool, args: list[str]) -> float:
    if b.name == "soak" and not quick and "--minutes" in args:
        return float(args[args.index("--minutes") + 1]) * 60.0 + 900.0
    return b.timeout_quick_s if quick else b.timeout_full_s


# -- running one ----------------------------------------------------------------------------------------


def run_benchmark(b: Bench, cmd: list[str], out: Path, log_path: Path, timeout_s: float,
                  progress_every_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """Run one benchmark to its end or its timeout; its record for results.json.

    It runs in its own process group: past the timeout it gets SIGTERM, and 30 s later the whole group gets
    SIGKILL, brokers and workers it started included. Its stdout and stderr go to ``log_path`` (stdout to
    ``out`` when it prints its JSON).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)  # a stale file must not pass for this run's output
    t0 = clock()
    timed_out = False
    with contextlib.ExitStack() as files:
        logf = files.enter_context(log_path.open("wb"))
        stdout = files.enter_context(out.open("wb")) if b.stdout_json else logf
        proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=stdout, stderr=logf,
                                start_new_session=True)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=progress_every_s)
                    break
                except subprocess.TimeoutExpired:
                    elapsed = clock() - t0
                    if elapsed >= timeout_s:
                        log(f"{b.name}: timed out after {elapsed:.0f} s; stopping it")
                        timed_out = True
                        rc = _stop_group(proc)
                        break
                    log(f"{b.name}: still running, {elapsed:.0f} s (timeout {timeout_s:.0f} s); "
                        f"log {_rel(log_path)}")
        except BaseException:
            _stop_group(proc)
            raise
    seconds = round(clock() - t0, 1)
    data, error = None, None
    if out.is_file() and out.stat().st_size:
        try:
            data = json.loads(out.read_text(encoding="utf-8"))
        except ValueError as e:
            error = f"its JSON output {_rel(out)} does not parse: {e}"
    elif not timed_out:
        error = f"it wrote no JSON to {_rel(out)}"
    if timed_out:
        error = f"timed out after {timeout_s:.0f} s"
    elif rc != 0:
        error = f"exit status {rc}: " + _tail(log_path)
    return {"ok": rc == 0 and not timed_out and data is not None and error is None, "seconds": seconds,
            "returncode": rc, "timed_out": timed_out, "command": shlex.join(cmd), "log": str(log_path),
            "json": str(out), "error": error, "out": data}


def _stop_group(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> int:
    """SIGTERM to the benchmark, so that its own clean-up stops what it started and it may still write its
    JSON; SIGKILL to its whole process group after ``grace_s``, and to whatever it left behind."""
    proc.terminate()
    try:
        rc = proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        rc = None
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait() if rc is None else rc


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


# -- the machine ----------------------------------------------------------------------------------------

# CPU features that decide how fast onnxruntime's kernels can be (x86 flags, Arm features).
SIMD_FLAGS = ("sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
              "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
              "neon", "asimd", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2")


def cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """The first CPU's flags (x86 ``flags``) or features (Arm ``Features``) from /proc/cpuinfo; [] elsewhere."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return []
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return value.split()
    return []


def machine_details() -> dict[str, Any]:
    """edge_runtime's machine_info() plus what these benchmarks depend on: CPU flags, onnxruntime, commit."""
    import numpy as np

    from edge_runtime.adapters.onnx_engine import ORT_VERSION, available_providers
    from edge_runtime.sysinfo import machine_info

    info = machine_info()
    flags = cpu_flags()
    info["cpu_simd"] = [f for f in SIMD_FLAGS if f in flags]
    info["cpu_flags"] = flags
    info["onnxruntime"] = ORT_VERSION
    info["onnxruntime_providers"] = available_providers()
    info["numpy"] = np.__version__
    info["git"] = git_commit()
    return info


def git_commit() -> dict[str, Any] | None:
    """The checked-out commit and whether tracked files differ from it (read-only git commands)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=False)
        if head.returncode != 0:
            return None
        diff = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=REPO, capture_output=True,
                              timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": head.stdout.strip(), "uncommitted_changes": diff.returncode == 1}


# -- the headline table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One headline figure, the baseline measured beside it in the same run, and figure / baseline."""

    benchmark: str
    figure: str
    value: str
    baseline: str
    ratio: str


def num(v: float | None, unit: str = "") -> str:
    if v is None:
        return "n/a"
    a = abs(v)
    whole = a >= 100 or float(v).is_integer()
    s = f"{v:,.0f}" if whole else f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 0.1 else f"{v:.3g}"
    return f"{s} {unit}".rstrip()


def ratio(v: float | None, base: float | None) -> str:
    if v is None or base is None or base == 0:
        return "n/a"
    return f"{v / base:.2f}x"


def _rows_loop_overhead(d: dict[str, Any]) -> list[Row]:
    rows = []
    for c in d.get("cases", []):
        s = c["summary"]

        def med(key: str, s: dict[str, Any] = s) -> float | None:
            return s[key]["median"] if s.get(key) else None

        for q, a, b in (("p50", "agent_us", "bare_us"), ("p99", "agent_p99_us", "bare_p99_us")):
            rows.append(Row("loop_overhead", f"{c['case']}: agent loop {q}", num(med(a), "us"),
                            f"bare session.run {num(med(b), 'us')}", ratio(med(a), med(b))))
    return rows


def _rows_quantize(d: dict[str, Any]) -> list[Row]:
    rows = []
    for model, rep in d.get("reports", {}).items():
        variants = {v["name"]: v for v in rep.get("variants", [])}
        chosen, fp32 = variants.get(rep["chosen"]["name"]), variants.get("fp32")
        if not chosen or not fp32:
            continue
        drop = chosen.get("accuracy_drop_pts")
        rows.append(Row("quantize", f"{model}: chosen {chosen['name']}, median latency"
                                    + ("" if drop is None else f" (accuracy {plotting.points(-drop)})"),
                        num(chosen["median_us"], "us"), f"fp32 {num(fp32['median_us'], 'us')}",
                        ratio(chosen["median_us"], fp32["median_us"])))
    return rows


def _rows_drift(d: dict[str, Any]) -> list[Row]:
    rows = []
    river = bool(d.get("river", {}).get("available"))
    for v in d.get("verdicts", []):
        dets = d["scenarios"][v["scenario"]]["detectors"]
        ours = dets[v["ours"]]
        best = None
        for k, r in dets.items():
            if k.startswith("river") and k not in v.get("not_comparable", []):
                key = (r.get("miss_rate") or 0.0, r["median_delay"] if r.get("median_delay") is not None else 1e18)
                if best is None or key < best[0]:
                    best = (key, k, r)

        def show(r: dict[str, Any]) -> str:
            miss = r.get("miss_rate") or 0.0
            return num(r.get("median_delay"), "samples") + (f", {miss:.0%} missed" if miss else "")

        if best is None:
            base = "river not installed" if not river else "no river setting at our false-alarm rate"
            rows.append(Row("drift", f"{v['scenario']}: median delay", show(ours), base, "n/a"))
            continue
        _key, name, r = best
        rows.append(Row("drift", f"{v['scenario']}: median delay", show(ours),
                        f"{name.removeprefix('river ')}: {show(r)}", ratio(ours.get("median_delay"),
                                                                           r.get("median_delay"))))
    return rows


def _rows_sync(d: dict[str, Any]) -> list[Row]:
    s, n = d["sync"], d["naive"]
    return [Row("sync", f"end to end through Mosquitto, {d['records']:,} records", num(s["records_per_s"], "rec/s"),
                f"naive delete-on-PUBACK {num(n['records_per_s'], 'rec/s')}",
                ratio(s["records_per_s"], n["records_per_s"])),
            Row("sync", "records lost", f"{s['lost']:,}", f"naive {n['lost']:,}", ratio(s["lost"], n["lost"]))]


def _rows_fleet(d: dict[str, Any]) -> list[Row]:
    rows = []
    runs = d.get("runs", [])
    top = max((r["devices"] for r in runs), default=None)
    echo = next((r for r in runs if r["case"] == "echo" and r["devices"] == top), None)
    for r in runs:
        if r["case"] == "echo" or r["devices"] != top:
            continue
        p99, ep99 = r["latency_ms"].get("p99"), echo["latency_ms"].get("p99") if echo else None
        rows.append(Row("fleet", f"{top:,} devices, {r['case']}: batch p99 (publish -> ack)", num(p99, "ms"),
                        f"echo {num(ep99, 'ms')}", ratio(p99, ep99)))
        got, want = r.get("records_committed_per_s"), echo.get("records_acked_per_s") if echo else None
        rows.append(Row("fleet", f"{top:,} devices, {r['case']}: records committed/s (lost {r.get('lost')}, "
                                 f"duplicated {r.get('duplicated')})", num(got, "rec/s"),
                        f"echo {num(want, 'rec/s')}", ratio(got, want)))
    return rows


def _rows_soak(d: dict[str, Any]) -> list[Row]:
    fig = d.get("summary", {}).get("figures", {})
    rows = []
    for key, label, unit in (("rss_mb", "agent RSS at the end", "MB"), ("p99_us", "agent p99, last window", "us"),
                             ("fds", "open fds at the end", "")):
        f = fig.get(key)
        if f:
            rows.append(Row("soak", f"{d.get('ran_s', 0):.0f} s: {label}", num(f.get("end"), unit),
                            f"after warm-up {num(f.get('baseline'), unit)}", ratio(f.get("end"), f.get("baseline"))))
    acc = d.get("accounting") or {}
    if acc:
        rows.append(Row("soak", "records lost / duplicated in the store", f"{acc.get('lost')} / "
                        f"{acc.get('duplicated_stored')}", f"committed {acc.get('committed'):,}", "n/a"))
    return rows


def _rows_bundle_verify(d: dict[str, Any]) -> list[Row]:
    return [Row("bundle_verify", f"verify a {d['bundle_bytes'] / 1e6:.1f} MB bundle", num(d["verify_ms"], "ms"),
                f"bare model load {num(d['baseline_bare_load_ms'], 'ms')}",
                ratio(d["verify_ms"], d["baseline_bare_load_ms"]))]


def _rows_bundle_delivery(d: dict[str, Any]) -> list[Row]:
    f, one = d["fleet"], d["one_device"]
    return [Row("bundle_delivery", f"{d['bundle']['bytes'] / 1e6:g} MB to {f['devices']} devices, last verified",
                num(f["seconds_to_last_verified"], "s"), f"one device {num(one['seconds_to_last_verified'], 's')}",
                ratio(f["seconds_to_last_verified"], one["seconds_to_last_verified"]))]


def _rows_hot_swap(d: list[dict[str, Any]]) -> list[Row]:
    return [Row("hot_swap", f"{o['model']} at {o['hz']:g}/s: output gap across a swap (median)",
                num(o["swap_gap_ms"]["median"], "ms"), f"normal gap {num(o['normal_gap_ms']['median'], 'ms')}",
                ratio(o["swap_gap_ms"]["median"], o["normal_gap_ms"]["median"])) for o in d]


def _rows_drift_in_agent(d: list[dict[str, Any]]) -> list[Row]:
    base = {o["data"]: o for o in d if o["monitor"] == "none"}
    rows = []
    for o in d:
        b = base.get(o["data"])
        if o["monitor"] == "none" or b is None:
            continue
        rows.append(Row("drift_in_agent", f"{o['data']}, monitor {o['monitor']}: throughput",
                        num(o["per_s"], "/s"), f"no monitor {num(b['per_s'], '/s')}", ratio(o["per_s"], b["per_s"])))
    return rows


def _rows_escalation(d: dict[str, Any]) -> list[Row]:
    rows = []
    acc, held, t = d.get("accuracy", {}), d.get("held_out", {}).get("score"), d.get("timing_us", {})
    if acc and held:
        rows.append(Row("escalation", f"accuracy, score rule tuned for {held['budget_rate']:.0%} "
                                      f"({100 * held['test_rate']:.1f} % escalated on test)",
                        f"{100 * held['test_accuracy']:.2f} %", f"device only {100 * acc['device_test']:.2f} %",
                        ratio(held["test_accuracy"], acc["device_test"])))
    dev = t.get("device_run_b1", {}).get("median")
    for key, label in (("cloud_run_b1", "cloud model run, batch 1"), ("decide_score_b1", "decide(), batch 1"),
                       ("escalated_input", "per escalated input (encode + budget + pending)")):
        v = t.get(key, {}).get("median")
        if v is not None:
            rows.append(Row("escalation", label, num(v, "us"), f"device model run {num(dev, 'us')}", ratio(v, dev)))
    return rows


HEADLINES: dict[str, Callable[[Any], list[Row]]] = {
    "loop_overhead": _rows_loop_overhead, "quantize": _rows_quantize, "drift": _rows_drift, "sync": _rows_sync,
    "fleet": _rows_fleet, "soak": _rows_soak, "bundle_verify": _rows_bundle_verify,
    "bundle_delivery": _rows_bundle_delivery, "hot_swap": _rows_hot_swap, "drift_in_agent": _rows_drift_in_agent,
    "escalation": _rows_escalation,
}


def headline_rows(benchmarks: dict[str, dict[str, Any]]) -> tuple[list[Row], list[str]]:
    """Rows from every benchmark that wrote JSON; a note for each whose JSON is not as expected."""
    rows: list[Row] = []
    notes: list[str] = []
    for name, rec in benchmarks.items():
        data, fn = rec.get("out"), HEADLINES.get(name)
        if data is None or fn is None:
            continue
        try:
            rows += fn(data)
        except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
            notes.append(f"{name}: no headline figures, its JSON is not as expected ({type(e).__name__}: {e})")
    return rows, notes


# -- RESULTS.md -----------------------------------------------------------------------------------------


def replace_section(text: str, section: str) -> str:
    """``text`` with the run_all section (``section``, markers included) in place of the old one; when there
    is none, inserted before the first level-2 heading (after the introduction), or appended. Everything
    outside the markers is kept byte for byte."""
    if not (section.startswith(BEGIN) and section.rstrip("\n").endswith(END)):
        raise ValueError(f"a run_all section starts with {BEGIN!r} and ends with {END!r}")
    section = section.rstrip("\n") + "\n"
    nb, ne = text.count(BEGIN), text.count(END)
    if nb or ne:
        if nb != 1 or ne != 1 or text.index(BEGIN) > text.index(END):
            raise ValueError(f"expected one {BEGIN!r} before one {END!r}; found {nb} begin and {ne} end markers")
        start, end = text.index(BEGIN), text.index(END) + len(END)
        if text[end:end + 1] == "\n":
            end += 1
        return text[:start] + section + text[end:]
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith("## "):
            return "".join(lines[:i]) + section + "\n" + "".join(lines[i:])
    sep = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
    return text + sep + section


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render_section(results: dict[str, Any], plot_links: list[tuple[plotting.Plot, str]]) -> str:
    """The markdown between the markers, from results.json's content and (plot, relative link) pairs."""
    m = results["machine"]
    benches = results["benchmarks"]
    failed = [n for n, r in benches.items() if not r["ok"]]
    git = m.get("git") or {}
    commit = (f" at commit `{git['commit'][:12]}`" + (" (with uncommitted changes)"
                                                      if git.get("uncommitted_changes") else "")) if git else ""
    minutes = results.get("seconds", 0) / 60
    simd = " ".join(m.get("cpu_simd") or []) or "none reported"
    out = [BEGIN, "## All benchmarks in one run (`benchmarks/run_all.py`)", "",
           "Written by `benchmarks/run_all.py`; its next run replaces everything between the `run_all` markers "
           "and keeps the rest of this file. The sections after this one describe each benchmark's method.", "",
           f"- **Machine:** {m.get('machine')}, {m.get('cpu')}, {m.get('cores')} cores, {m.get('ram_gb')} GB RAM"
           + (f", board {m['board']}" if m.get("board") else "") + f", {m.get('os')}, Python {m.get('python')}, "
           f"numpy {m.get('numpy')}, onnxruntime {m.get('onnxruntime')} (providers: "
           f"{', '.join(m.get('onnxruntime_providers') or []) or 'n/a'}); SIMD flags: {simd}",
           f"- **Command:** `{results['command']}`{commit}",
           f"- **Date:** {results['started_utc']} to {results['finished_utc']} ({minutes:.0f} min); "
           f"{'quick' if results.get('quick') else 'full'} settings",
           f"- **Benchmarks:** {len(benches)} ran, "
           + (f"{len(failed)} failed: {', '.join(failed)}" if failed else "all succeeded")
           + "; raw results in `results.json` of the output folder", ""]
    rows, notes = headline_rows(benches)
    out += ["### Headline figures", "",
            "Each figure next to the baseline that the same benchmark measured in the same run; the ratio is "
            "figure / baseline (below 1 is faster for a time, slower for a rate).", "",
            "| benchmark | figure | value | baseline (same run) | ratio |", "|---|---|---:|---:|---:|"]
    out += [f"| {r.benchmark} | {_md_cell(r.figure)} | {_md_cell(r.value)} | {_md_cell(r.baseline)} | {r.ratio} |"
            for r in rows]
    out.append("")
    if plot_links:
        out += ["### Plots", ""]
        for p, link in plot_links:
            out += [f"**{p.title}** ({p.benchmark})", "", f"![{p.title}]({link})", "", p.caption, ""]
    notes = [*notes, *results.get("notes", [])]
    if notes:
        out += ["### Notes", "", *[f"- {_md_cell(n)}" for n in notes], ""]
    out += ["### Runs", "", "| benchmark | status | seconds | settings |", "|---|---|---:|---|"]
    for name, r in benches.items():
        status = "ok" if r["ok"] else ("timed out" if r.get("timed_out") else "FAILED")
        out.append(f"| {name} | {status} | {r['seconds']:.0f} | `{shlex.join(r.get('args', [])) or '(defaults)'}` |")
    out += ["", END]
    return "\n".join(out) + "\n"


def write_results_md(path: Path, section: str) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    new = replace_section(text, section)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(path)


# -- main -----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="benchmarks: " + ", ".join(b.name for b in BENCHMARKS))
    ap.add_argument("--quick", action="store_true", help="each benchmark at its smoke test's short settings")
    ap.add_argument("--only", metavar="NAME[,NAME]", help="run only these (names or script stems)")
    ap.add_argument("--skip", metavar="NAME[,NAME]", help="run all but these")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and their settings, run nothing")
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                    help=f"results.json, each benchmark's JSON and log, plots (default {_rel(DEFAULT_OUT_DIR)})")
    ap.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS,
                    help=f"sample models, built there when missing (default {_rel(DEFAULT_MODELS)})")
    ap.add_argument("--timeout", type=float, help="per-benchmark timeout in s (default: each benchmark's own, "
                                                  "e.g. 5 min quick, 30 min full)")
    ap.add_argument("--fleet-devices", help="fleet_sim's --devices (full default 100,300,1000: latency vs devices)")
    ap.add_argument("--soak-minutes", type=float, help="soak length (full default 10)")
    ap.add_argument("--results-md", type=Path, default=DEFAULT_RESULTS_MD,
                    help=f"the markdown file whose run_all section is regenerated (default {_rel(DEFAULT_RESULTS_MD)})")
    ap.add_argument("--write-results", action=argparse.BooleanOptionalAction, default=None,
                    help="regenerate --results-md (default: yes on a full run of every benchmark, no with --quick, "
                         "--only or --skip)")
    ap.add_argument("--plots-dir", type=Path,
                    help=f"also copy the PNGs here, and link them from there (default {_rel(DEFAULT_PLOTS_DIR)} "
                         "on a full run of every benchmark, none otherwise)")
    ap.add_argument("--replot", action="store_true",
                    help="run nothing: redraw the plots and the section from OUT_DIR/results.json")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        only, skip = resolve_names(args.only), resolve_names(args.skip)
    except ValueError as e:
        print(f"run_all: {e}", file=sys.stderr)
        return 2
    chosen = select(only, skip)
    out_dir = args.out_dir.resolve()
    models_dir = args.models_dir.resolve()

    if args.list:
        for b in BENCHMARKS:
            a = settings_args(b, args.quick, args.fleet_devices, args.soak_minutes)
            print(f"{b.name:16} {b.script:20} {b.what}\n{'':16} {'quick' if args.quick else 'full'}: "
                  f"{shlex.join(a) or '(defaults)'}")
        return 0
    if not chosen:
        print("run_all: --only/--skip left no benchmark to run", file=sys.stderr)
        return 2

    status = 0
    if args.replot:
        path = out_dir / "results.json"
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            print(f"run_all: --replot needs {path}: {e}", file=sys.stderr)
            return 2
        results["notes"] = [n for n in results.get("notes", []) if n.startswith("interrupted")]
    else:
        signal.signal(signal.SIGTERM, _interrupt)  # like Ctrl-C: stop the running benchmark, write what there is
        shown = [Path(sys.executable).name, _rel(Path(__file__)), *(sys.argv[1:] if argv is None else argv)]
        results, status = run_all(chosen, args, shlex.join(shown), out_dir, models_dir)

    # Only a full-settings run of every benchmark speaks for the project: it alone updates tracked files.
    complete = not results.get("quick") and {b.name for b in BENCHMARKS} <= set(results["benchmarks"]) \
        and not any(n.startswith("interrupted") for n in results.get("notes", []))
    write_md = args.write_results if args.write_results is not None else complete
    plots_dir = args.plots_dir or (DEFAULT_PLOTS_DIR if complete else None)
    plots, notes = plotting.make_plots({n: r.get("out") for n, r in results["benchmarks"].items()},
                                       out_dir / "plots")
    results["notes"] = [*results.get("notes", []), *notes]
    results["plots"] = [{"file": str(out_dir / "plots" / p.file), "benchmark": p.benchmark, "title": p.title,
                         "caption": p.caption} for p in plots]
    link_dir = out_dir / "plots"
    if plots_dir is not None and plots:
        plots_dir = plots_dir.resolve()
        plots_dir.mkdir(parents=True, exist_ok=True)
        for p in plots:
            shutil.copyfile(out_dir / "plots" / p.file, plots_dir / p.file)
        link_dir = plots_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")

    md = args.results_md.resolve()
    links = [(p, Path(os.path.relpath(link_dir / p.file, md.parent)).as_posix()) for p in plots]
    section = render_section(results, links)
    (out_dir / "RESULTS.section.md").write_text(section, encoding="utf-8")
    if write_md:
        try:
            write_results_md(md, section)
        except ValueError as e:
            print(f"run_all: {md} not written: {e}", file=sys.stderr)
            status = status or 1
        else:
            log(f"regenerated the run_all section of {_rel(md)}")
    else:
        log(f"{_rel(md)} left as it is (--write-results writes it); the section is in "
            f"{_rel(out_dir / 'RESULTS.section.md')}")
    print_summary(results, out_dir, plots, plots_dir)
    return status


def _interrupt(_sig: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def run_all(chosen: list[Bench], args: argparse.Namespace, command: str, out_dir: Path,
            models_dir: Path) -> tuple[dict[str, Any], int]:
    """Every chosen benchmark in turn; results.json's content (without plots) and the exit status."""
    results: dict[str, Any] = {
        "command": command, "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick, "out_dir": str(out_dir), "models_dir": str(models_dir),
        "machine": machine_details(), "benchmarks": {}, "notes": [],
    }
    t_start = time.monotonic()
    status = 0
    try:
        for i, b in enumerate(chosen, 1):
            bargs = settings_args(b, args.quick, args.fleet_devices, args.soak_minutes)
            timeout = args.timeout or timeout_for(b, args.quick, bargs)
            cmd = bench_command(b, bargs, out_dir / f"{b.name}.json", models_dir)
            log(f"[{i}/{len(chosen)}] {b.name}: {b.what} ({'quick' if args.quick else 'full'}, "
                f"timeout {timeout:.0f} s)")
            rec = run_benchmark(b, cmd, out_dir / f"{b.name}.json", out_dir / "logs" / f"{b.name}.log", timeout)
            rec["args"] = bargs
            results["benchmarks"][b.name] = rec
            if rec["ok"]:
                log(f"[{i}/{len(chosen)}] {b.name}: ok in {rec['seconds']:.1f} s "
                    f"(total {time.monotonic() - t_start:.0f} s)")
            else:
                status = 1
                log(f"[{i}/{len(chosen)}] {b.name}: FAILED in {rec['seconds']:.1f} s: {rec['error']}")
    except KeyboardInterrupt:
        results["notes"].append("interrupted (Ctrl-C or SIGTERM): the benchmarks after the last one listed did not run")
        log("interrupted; writing what there is")
        status = 130
    results["finished_utc"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["seconds"] = round(time.monotonic() - t_start, 1)
    return results, status


def print_summary(results: dict[str, Any], out_dir: Path, plots: list[plotting.Plot], plots_dir: Path | None) -> None:
    print(f"\n{'benchmark':16} {'status':10} {'seconds':>8}")
    for name, r in results["benchmarks"].items():
        status = "ok" if r["ok"] else ("timed out" if r.get("timed_out") else "FAILED")
        print(f"{name:16} {status:10} {r['seconds']:8.1f}")
    failed = [n for n, r in results["benchmarks"].items() if not r["ok"]]
    print(f"\n{len(results['benchmarks'])} benchmarks in {results.get('seconds', 0):.0f} s"
          + (f"; FAILED: {', '.join(failed)} (logs in {_rel(out_dir / 'logs')})" if failed else "; all ok"))
    print(f"results: {_rel(out_dir / 'results.json')}")
    if plots:
        print(f"plots: {', '.join(p.file for p in plots)} in {_rel(out_dir / 'plots')}"
              + (f" and {_rel(plots_dir)}" if plots_dir else ""))
    for n in results.get("notes", []):
        print(f"note: {n}")


if __name__ == "__main__":
    sys.exit(main())
