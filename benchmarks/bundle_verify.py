"""How long `bundle verify` takes on a ~5 MB bundle, against loading the same model bare.

Baseline, measured in the same process and run: what any loader pays anyway, reading the model file
and creating an onnxruntime session on it. The figure of interest is the full verification
(signature, sizes and sha256 of every file, onnx's checker, smoke run) as a ratio of that baseline,
plus the wall time of the `edge-runtime bundle verify` command (a fresh process, imports included).

Usage: python benchmarks/bundle_verify.py [--repeats N] [--models-dir DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import ensure_models  # noqa: E402

from edge_runtime.adapters import ed25519  # noqa: E402
from edge_runtime.adapters.onnx_engine import ORT_VERSION, OnnxEngine  # noqa: E402
from edge_runtime.bundle import CreateOptions, create_bundle, verify_bundle  # noqa: E402
from edge_runtime.profiles import detect_profile  # noqa: E402
from edge_runtime.sysinfo import machine_info  # noqa: E402


def log(msg: str) -> None:
    print(f"[bundle_verify] {msg}", file=sys.stderr, flush=True)


def median_ms(fn: Any, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--models-dir", type=Path, default=REPO / "benchmarks" / "out" / "models")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "bundle_verify.json")
    args = ap.parse_args(argv)
    model = args.models_dir / "cnn.onnx"
    ensure_models(args.models_dir, ["cnn.onnx", "cnn.calib_x.npy"], log)
    profile = detect_profile()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        ed25519.write_keypair(ed25519.generate(), t / "key")
        keys = [ed25519.read_public(t / "key.pub")]
        # The ~4 MB model, a reference profile of its calibration inputs and 20 smoke inputs of
        # 3x64x64 float32 (~1 MB): a ~5 MB bundle.
        opts = CreateOptions(reference=str(args.models_dir / "cnn.calib_x.npy"), smoke_samples=20)
        bundle = create_bundle(model, "1", t / "key", t / "b", opts, profile, progress=lambda _m: None)
        size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
        log(f"bundle of {size / 1e6:.2f} MB ({len(list(bundle.rglob('*')))} entries); {args.repeats} repeats each")
        verify_bundle(bundle, keys, profile=profile)  # warm the page cache and imports alike for both sides

        def bare() -> None:
            (bundle / "model.onnx").read_bytes()
            OnnxEngine(bundle / "model.onnx", profile)

        base, base_all = median_ms(bare, args.repeats)
        full, full_all = median_ms(lambda: verify_bundle(bundle, keys, profile=profile), args.repeats)
        nosmoke, _ = median_ms(lambda: verify_bundle(bundle, keys, profile=profile, smoke=False), args.repeats)
        checks = verify_bundle(bundle, keys, profile=profile).checks
        cmd = [sys.executable, "-m", "edge_runtime.cli", "bundle", "verify", str(bundle), "--key",
               str(t / "key.pub")]
        cli_ms, _ = median_ms(lambda: subprocess.run(cmd, check=True, capture_output=True), max(3, args.repeats // 3))
    result = {
        "benchmark": "bundle_verify", "timestamp_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine_info(),
        "onnxruntime": ORT_VERSION, "profile": profile.name, "bundle_bytes": size,
        "baseline_bare_load_ms": round(base, 2), "verify_ms": round(full, 2), "verify_no_smoke_ms": round(nosmoke, 2),
        "ratio_verify_over_bare_load": round(full / base, 2), "cli_wall_ms": round(cli_ms, 1),
        "checks_ms": {c["check"]: c.get("ms") for c in checks},
        "raw_ms": {"bare": [round(x, 2) for x in base_all], "verify": [round(x, 2) for x in full_all]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"bundle {size / 1e6:.2f} MB on {profile.name} (onnxruntime {ORT_VERSION}), medians of {args.repeats}:")
    print(f"  bare load (read model + create session)   {base:8.1f} ms   (baseline)")
    print(f"  verify, all checks                        {full:8.1f} ms   ({full / base:.2f}x baseline)")
    print(f"  verify without the smoke run              {nosmoke:8.1f} ms")
    print(f"  `edge-runtime bundle verify` wall time    {cli_ms:8.1f} ms   (new process, imports included)")
    print("  per check (last run): " + ", ".join(f"{k} {v} ms" for k, v in result["checks_ms"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
