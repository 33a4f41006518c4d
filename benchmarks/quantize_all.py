"""`edge-runtime quantize` on every sample model: each variant's speedup and accuracy, and the choice.

The baseline of each model is its own fp32 variant, timed in the same run in alternating blocks with
the others. Labels are given for every model, so accuracy is top-1 accuracy on held-out data.

Usage: python benchmarks/quantize_all.py [--seconds S] [--models-dir DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import ensure_models  # noqa: E402 - benchmarks/ holds scripts, not a package

CLI = [sys.executable, "-m", "edge_runtime.cli"]

# model, calibration data, evaluation data, labels (files written by models/build_all.py)
CASES = [
    ("digits_mlp", "digits_mlp.train_x.npy", "digits_mlp.test_x.npy", "digits_mlp.test_y.npy"),
    ("tabular", "tabular.train_x.npy", "tabular.test_x.npy", "tabular.test_y.npy"),
    ("cnn", "cnn.calib_x.npy", "cnn.test_x.npy", "cnn.test_y.npy"),
]


def log(msg: str) -> None:
    print(f"[quantize_all] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="timing seconds per variant (default 3)")
    ap.add_argument("--models-dir", type=Path, default=REPO / "benchmarks" / "out" / "models")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "quantize_all.json")
    ap.add_argument("--profile", help="device profile (default: detected)")
    args = ap.parse_args(argv)
    ensure_models(args.models_dir, [f for c in CASES for f in (f"{c[0]}.onnx", *c[1:])], log)
    reports: dict[str, Any] = {}
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, calib, evalx, labels in CASES:
            d = args.models_dir
            cmd = [*CLI, "quantize", "--model", str(d / f"{name}.onnx"), "--calibration", str(d / calib),
                   "--eval", str(d / evalx), "--labels", str(d / labels), "--out", str(Path(tmp) / name),
                   "--seconds", str(args.seconds), "--json", "--log-level", "warning"]
            if args.profile:
                cmd += ["--profile", args.profile]
            log(f"{name}: {' '.join(cmd[2:])}")
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                failed.append(name)
                log(f"{name} failed: {proc.stderr.strip()[-1500:]}")
                continue
            reports[name] = json.loads(proc.stdout)
    for name, r in reports.items():
        print(f"\n{name} ({r['profile']}, {', '.join(r['providers'])}, onnxruntime {r['onnxruntime']}): "
              f"chosen {r['chosen']['name']} - {r['chosen']['reason']}")
        print(f"  {'variant':30}{'median us':>11}{'speedup':>9}{'accuracy %':>12}{'drop pts':>10}{'size KB':>9}")
        for v in r["variants"]:
            if v.get("error"):
                print(f"  {v['name']:30}{v['error']}")
                continue
            print(f"  {v['name']:30}{v['median_us']:>11.1f}{v['speedup']:>9.2f}{v['accuracy']:>12.2f}"
                  f"{v['accuracy_drop_pts']:>10.2f}{v['size_bytes'] / 1024:>9.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "quantize_all",
                                    "timestamp_utc": datetime.now(UTC).isoformat(timespec="seconds"),
                                    "command": " ".join([Path(sys.executable).name, *sys.argv]),
                                    "reports": reports, "failed": failed}, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
