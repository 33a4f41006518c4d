"""Build every model in this folder into one directory (default models/out).

Why: one command regenerates all build outputs (none are committed) for tests,
benchmarks and device images. models/ is not a package, so the sibling scripts are
loaded by path; this works both as a script and when this file is itself loaded by path.

Usage: python models/build_all.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_script, logger

HERE = Path(__file__).resolve().parent
SCRIPTS = ("build_digits_mlp", "build_tabular", "build_cnn", "build_test_models", "build_escalation_pair")
DEFAULT_OUT = HERE / "out"


_log = logger("build_all")


def build(out_dir: Path) -> dict[str, Any]:
    """Run each script's build(out_dir); return {script: summary + build_seconds}."""
    out_dir = Path(out_dir)
    results: dict[str, Any] = {}
    for name in SCRIPTS:
        start = time.perf_counter()
        summary = load_script(name).build(out_dir)
        summary["build_seconds"] = round(time.perf_counter() - start, 3)
        results[name] = summary
        _log(f"{name}: {summary['build_seconds']:.2f} s")
    return results


def main(argv: list[str] | None = None) -> int:
    """CLI entry: build everything into --out, log to stderr, one JSON line to stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = build(args.out)
    digits, tabular, cnn = results["build_digits_mlp"], results["build_tabular"], results["build_cnn"]
    _log(f"digits_mlp ONNX test accuracy {digits['onnx_test_accuracy']:.4f}")
    _log(f"tabular ONNX test accuracy {tabular['onnx_test_accuracy']:.4f}")
    _log(f"cnn ONNX test accuracy {cnn['onnx_test_accuracy']:.4f} ({cnn['method']}), "
         f"batch-1 median latency {cnn['latency_ms_batch1']['median']:.3f} ms")
    _log(f"test models: {', '.join(results['build_test_models']['models'])}")
    pair = results["build_escalation_pair"]
    _log(f"escalation pair (escalation/): device {pair['device']['variant']} test accuracy "
         f"{pair['device']['test_accuracy']:.4f}, cloud {pair['cloud']['test_accuracy']:.4f}")
    files = sorted(p.name for p in Path(args.out).iterdir() if p.is_file())
    _log(f"all built in {time.perf_counter() - start:.2f} s -> {args.out}: {', '.join(files)}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
