"""Escalation to a larger cloud model on the sample pair: combined accuracy against escalation rate, the two
models' latency, and what escalation adds on the device, all measured in one run.

What it measures (the pair from models/build_escalation_pair.py: a 610-weight MLP on the device, a soft vote
of three (256, 128) MLPs in the cloud, scikit-learn digits):

1. **Curve.** For the rules "top-1 score < t" and "top-1 minus top-2 < t": combined accuracy (the cloud
   model's real answer on escalated rows, the device's elsewhere) at escalation rates 0-30 % in 0.5 %
   steps on the test split, with the threshold for each rate; device-only and cloud-only accuracy.
2. **Held out.** The threshold chosen on the validation split for a 5 % budget (what `edge-runtime
   escalation tune` does), applied with ``decide()`` to the test split: the escalation rate and combined
   accuracy it really gives on data it was not tuned on.
3. **Latency.** Bare onnxruntime ``session.run`` of each model at batch 1 (sessions built from the device
   profile as the agent builds them), medians over alternating ~50 ms blocks, cycling through the test rows.
4. **Device-side cost**, timed in the same alternating blocks: ``decide()`` per batch of 1 and of 32 (and
   per input), and per escalated input: encoding the model input (share = features), the budget's
   ``try_take``, and the pending table's ``add`` + ``resolve``; a 640x480 camera frame downscaled
   (share = downscaled) for information.
5. Prints a table and a "Targets (information only)" section, and writes the raw results, machine info,
   the command and a UTC timestamp to ``--out``.

Exit status: 0 when every step ran, whatever the targets say; 1 otherwise.

Usage: python benchmarks/escalation_curve.py [--quick] [--seconds S] [--models-dir DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import ensure_models  # noqa: E402 - benchmarks/ holds scripts, not a package

from edge_runtime.adapters.onnx_engine import ORT_VERSION, OnnxEngine  # noqa: E402
from edge_runtime.bench import time_round_robin  # noqa: E402
from edge_runtime.core.escalation import (  # noqa: E402
    RULES,
    Budget,
    EscalationPolicy,
    PendingAnswers,
    choose,
    decide,
    encode_payload,
    tuning_curve,
)
from edge_runtime.profiles import detect_profile, load_profile  # noqa: E402
from edge_runtime.sysinfo import machine_info  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "out" / "escalation_curve.json"
PAIR = "escalation"
FILES = [f"{PAIR}/{f}" for f in ("device.onnx", "cloud.onnx", "val_x.npy", "val_y.npy", "test_x.npy", "test_y.npy")]
BUDGET = 0.05

# Targets (information only).
MAX_DECIDE_US_B1 = 10.0          # decide() on a batch of 1
MAX_ESCALATED_US = 50.0          # encode + budget + pending add/resolve, per escalated input
MIN_GAP_CLOSED = 1 / 3           # held-out: share of the device-to-cloud accuracy gap closed at <= 5 % escalation


def log(msg: str) -> None:
    print(f"[escalation_curve] {msg}", file=sys.stderr, flush=True)


def fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def median_us(ns: np.ndarray) -> float:
    return round(float(np.median(ns)) / 1e3, 3)


def p99_us(ns: np.ndarray) -> float:
    return round(float(np.percentile(ns, 99)) / 1e3, 3)


def run_all(sess: Any, x: np.ndarray) -> list[np.ndarray]:
    return [np.concatenate(parts) for parts in zip(*(sess.run(None, {"input": x[i:i + 256]})
                                                     for i in range(0, len(x), 256)), strict=True)]


def measure(args: argparse.Namespace, d: Path, results: dict[str, Any]) -> None:
    profile = load_profile(args.profile) if args.profile else detect_profile()
    results["profile"] = profile.name
    device = OnnxEngine(d / "device.onnx", profile, name="device")
    cloud = OnnxEngine(d / "cloud.onnx", profile, name="cloud")
    results["providers"] = {"device": device.providers, "cloud": cloud.providers}
    data = {s: (np.load(d / f"{s}_x.npy"), np.load(d / f"{s}_y.npy")) for s in ("val", "test")}
    out: dict[str, dict[str, Any]] = {}
    for split, (x, _y) in data.items():
        dev_label, dev_proba = run_all(device.session, x)
        cloud_label = run_all(cloud.session, x)[0]
        out[split] = {"scores": dev_proba, "device": dev_label, "cloud": cloud_label}

    # 1-2: curves on the test split; thresholds chosen on validation, applied to test
    xt, yt = data["test"]
    s_test, c_test = out["test"]["scores"], out["test"]["cloud"]
    results["accuracy"] = {"device_test": float((s_test.argmax(1) == yt).mean()),
                           "cloud_test": float((c_test == yt).mean()),
                           "device_val": float((out["val"]["scores"].argmax(1) == data["val"][1]).mean()),
                           "cloud_val": float((out["val"]["cloud"] == data["val"][1]).mean()),
                           "n_test": len(yt), "n_val": len(data["val"][1])}
    results["curves"], results["held_out"] = {}, {}
    for rule in RULES:
        curve = tuning_curve(s_test, yt, c_test, rule=rule)
        results["curves"][rule] = curve.to_dict()
        tuned = choose(tuning_curve(out["val"]["scores"], data["val"][1], out["val"]["cloud"], rule=rule), BUDGET)
        policy = EscalationPolicy().with_threshold(rule if tuned.n_escalated else None, tuned.threshold)
        esc = decide(policy, s_test).escalate
        combined = np.where(esc, c_test, s_test.argmax(1))
        results["held_out"][rule] = {"budget_rate": BUDGET, "threshold": tuned.threshold,
                                     "val_rate": tuned.rate, "val_accuracy": tuned.accuracy,
                                     "test_rate": float(esc.mean()), "test_accuracy": float((combined == yt).mean())}

    # 3-4: latency and device-side cost, in alternating blocks
    rows = itertools.cycle(range(len(xt)))
    row_feeds = [{"input": xt[i:i + 1]} for i in range(len(xt))]
    s1 = s_test[:1].copy()
    s32 = s_test[:32].copy()
    score_policy = EscalationPolicy(score_below=0.5)
    margin_policy = EscalationPolicy(margin_below=0.2)
    share_policy = EscalationPolicy(score_below=0.5, share="features")
    budget = Budget(1e6, 10**12)
    pending = PendingAnswers(deadline_s=2.0, max_pending=1024)
    clock = itertools.count()
    frame = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)

    def escalated_input() -> None:
        i = next(rows)
        t = float(next(clock))
        enc = encode_payload(xt[i], share_policy.share, share_policy.max_payload_bytes)
        assert enc.data is not None
        if budget.try_take(len(enc.data), t):
            pending.add(str(t), 0, t)
            pending.resolve(str(t), 1, t + 0.1)

    runs = {
        "device_run_b1": lambda: device.session.run(None, row_feeds[next(rows)]),
        "cloud_run_b1": lambda: cloud.session.run(None, row_feeds[next(rows)]),
        "decide_score_b1": lambda: decide(score_policy, s1),
        "decide_score_b32": lambda: decide(score_policy, s32),
        "decide_margin_b1": lambda: decide(margin_policy, s1),
        "decide_margin_b32": lambda: decide(margin_policy, s32),
        "encode_features": lambda: encode_payload(xt[next(rows)], "features", 16384),
        "budget_try_take": lambda: budget.try_take(144, float(next(clock))),
        "escalated_input": escalated_input,
        "encode_downscaled_640x480": lambda: encode_payload(frame, "downscaled", 16384),
    }
    times = time_round_robin(runs, args.seconds, args.warmup, progress=log)
    results["timing_us"] = {name: {"median": median_us(t), "p99": p99_us(t), "runs": int(t.size)}
                            for name, t in times.items()}
    enc = encode_payload(xt[0], "features", 16384)
    results["payload_bytes"] = {"features": len(enc.data) if enc.data else None,
                                "downscaled_640x480": len(encode_payload(frame, "downscaled", 16384).data or b"")}


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    t = r.get("timing_us", {})
    b1 = t.get("decide_score_b1", {}).get("median")
    esc = t.get("escalated_input", {}).get("median")
    acc = r.get("accuracy", {})
    held = r.get("held_out", {}).get("score", {})
    gap = None
    if acc and held and acc["cloud_test"] > acc["device_test"]:
        gap = (held["test_accuracy"] - acc["device_test"]) / (acc["cloud_test"] - acc["device_test"])
    return [
        {"target": f"decide() on a batch of 1 <= {MAX_DECIDE_US_B1:g} us", "value": b1, "unit": "us",
         "met": None if b1 is None else b1 <= MAX_DECIDE_US_B1},
        {"target": f"per escalated input (encode + budget + pending) <= {MAX_ESCALATED_US:g} us", "value": esc,
         "unit": "us", "met": None if esc is None else esc <= MAX_ESCALATED_US},
        {"target": f"held out, score rule tuned on validation for {BUDGET:.0%}: closes >= {MIN_GAP_CLOSED:.0%} "
                   "of the device-to-cloud accuracy gap on test", "value": None if gap is None else 100 * gap,
         "unit": "%", "met": None if gap is None else gap >= MIN_GAP_CLOSED},
    ]


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    acc, t = r.get("accuracy"), r.get("timing_us", {})
    m = r["machine"]
    print(f"\nEscalation on the sample pair ({m.get('cpu')}, {m.get('cores')} cores, profile {r.get('profile')}, "
          f"onnxruntime {ORT_VERSION})\n")
    if acc:
        dev_b1, cloud_b1 = t.get("device_run_b1", {}).get("median"), t.get("cloud_run_b1", {}).get("median")
        print(f"  device only  {100 * acc['device_test']:6.2f} % on test ({acc['n_test']} rows), "
              f"{fmt(dev_b1)} us per input (batch 1, median)")
        print(f"  cloud only   {100 * acc['cloud_test']:6.2f} % on test, {fmt(cloud_b1)} us per input "
              f"(batch 1, median, before any network)\n")
        curves = r["curves"]
        head = "".join(f"{rule + ' thr':>12}{rule + ' acc %':>14}" for rule in RULES)
        print(f"  {'rate %':>8}{head}")
        pts = {rule: curves[rule]["points"] for rule in RULES}
        for i in range(0, len(pts["score"]), 1 if args.all_points else 4):
            cells = "".join(f"{pts[rule][i]['threshold']:>12.4f}{100 * pts[rule][i]['accuracy']:>14.2f}"
                            if pts[rule][i]["n_escalated"] else f"{'-':>12}{100 * pts[rule][i]['accuracy']:>14.2f}"
                            for rule in RULES)
            print(f"  {100 * pts['score'][i]['target_rate']:>8.1f}{cells}")
        print()
        for rule, h in r["held_out"].items():
            print(f"  held out ({rule}): tuned on validation for {h['budget_rate']:.0%} (threshold "
                  f"{h['threshold']:.4f}, {100 * h['val_rate']:.2f} % escalated there): on test "
                  f"{100 * h['test_rate']:.2f} % escalated, combined accuracy {100 * h['test_accuracy']:.2f} %")
    if t:
        print("\n  device-side cost (median us; per input = per batch / batch size)")
        for name in ("decide_score_b1", "decide_score_b32", "decide_margin_b1", "decide_margin_b32",
                     "encode_features", "budget_try_take", "escalated_input", "encode_downscaled_640x480"):
            v = t.get(name)
            if v is None:
                continue
            per = f"  ({v['median'] / 32:.3f} per input)" if name.endswith("_b32") else ""
            print(f"    {name:28}{v['median']:>10.2f}   p99 {v['p99']:>9.2f}{per}")
        pb = r.get("payload_bytes", {})
        print(f"    payload: features {pb.get('features')} bytes per digits row; a 640x480x3 frame downscaled: "
              f"{pb.get('downscaled_640x480')} bytes")
    print("\nTargets (information only):")
    for tg in r["targets"]:
        verdict = "n/a " if tg["met"] is None else ("PASS" if tg["met"] else "FAIL")
        print(f"  {verdict}  {tg['target']}: {fmt(tg['value'])} {tg['unit']}")
    if r["errors"]:
        print(f"\nFailed steps: {', '.join(r['errors'])}")
    print(f"\nRaw results: {args.out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short timing (0.2 s per case) for CI")
    ap.add_argument("--seconds", type=float, help="measured seconds per timed case (default 1; --quick 0.2)")
    ap.add_argument("--models-dir", type=Path, default=REPO / "benchmarks" / "out" / "models")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--profile", help="device profile (default: detected)")
    ap.add_argument("--all-points", action="store_true", help="print every 0.5 %% step, not every 2 %%")
    args = ap.parse_args(argv)
    args.seconds = args.seconds or (0.2 if args.quick else 1.0)
    args.warmup = 0.05 if args.quick else 0.3
    results: dict[str, Any] = {"benchmark": "escalation_curve",
                               "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
                               "command": " ".join([Path(sys.executable).name, *sys.argv]), "quick": args.quick,
                               "machine": machine_info(), "onnxruntime": ORT_VERSION, "errors": {}}
    try:
        results["models"] = ensure_models(args.models_dir, FILES, log)
        measure(args, args.models_dir / PAIR, results)
    except Exception as e:
        results["errors"]["measure"] = f"{type(e).__name__}: {e}"
        log(f"failed:\n{traceback.format_exc()}")
    results["targets"] = targets(results)
    results["finished_utc"] = datetime.now(UTC).isoformat(timespec="seconds")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    report(results, args)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
