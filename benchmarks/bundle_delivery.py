"""Bundle delivery over MQTT: one bundle file to N simulated devices through Mosquitto.

What it does (each step on a fresh Mosquitto with its default settings, persistence off):

1. **Publish only.** ``cloud_sync.distribute.publish_bundle`` of a ``--size-mb`` file (random bytes: only
   the bytes matter here) with no device connected: the cloud side's cost, chunks then manifest, each
   acknowledged (QoS 1) with at most ``--window`` in flight.
2. **One device (baseline).** One device (``MqttTransport`` + ``BundleFetcher`` into its own temp
   folder) is connected and waiting for the manifest; the time runs from the first publish to its
   verified ``.tar`` (every chunk's sha256, then the whole file's).
3. **N devices.** The same with ``--devices`` devices (default 50; ``--quick``: 5), spread over
   ``--procs`` worker processes (one MQTT connection and one fetcher per device, each worker one Python
   process with one paho network thread per device), timed to the last device's verified file.
   Afterwards every device's file is hashed again and compared with the source; each worker reports
   its peak RSS (devices never hold the bundle in memory).
4. Prints a table (seconds, MB/s per device and in total) and writes the raw results,
   ``machine_info()``, the command and a UTC timestamp to ``--out``.

Exit status: 0 when every step ran and every device got the file, whatever the targets say; 1 otherwise.

Usage: python benchmarks/bundle_delivery.py [--quick] [--devices N] [--size-mb M] [--procs P] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import Mosquitto  # noqa: E402

from cloud_sync.distribute import PublishWindow, build_manifest, publish_bundle  # noqa: E402
from edge_runtime.adapters.mqtt_transport import BrokerConfig, MqttTransport  # noqa: E402
from edge_runtime.download import BundleFetcher  # noqa: E402
from edge_runtime.sysinfo import machine_info  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "out" / "bundle_delivery.json"
TARGET_S = 30.0  # 50 devices, 5 MB (information only)


def log(msg: str) -> None:
    print(f"[bundle_delivery] {msg}", file=sys.stderr, flush=True)


def fmt(v: Any, spec: str = ",.2f") -> str:
    return "-" if v is None else format(v, spec)


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


# -- a worker process: K devices ----------------------------------------------------------------------

def run_worker(args: argparse.Namespace) -> int:
    """Connect ``--count`` devices, print ``ready``, then one JSON line per device when done."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="[worker] %(name)s: %(message)s")
    dest = Path(args.dest)
    devices = []
    done_at: dict[str, float] = {}
    lock = threading.Lock()
    all_done = threading.Event()

    def finished(name: str) -> None:
        with lock:
            done_at[name] = time.monotonic()
            if len(done_at) == args.count:
                all_done.set()

    for k in range(args.count):
        name = f"bench-{args.first + k:03d}"
        holder: dict[str, BundleFetcher] = {}
        transport = MqttTransport(BrokerConfig.from_url(args.broker, name),
                                  on_message=lambda t, pl, h=holder: h["f"].on_message(t, pl))
        fetcher = BundleFetcher(transport, args.bundle_id, dest / name, window=args.window,
                                on_done=lambda _p, n=name: finished(n), on_failed=lambda _e, n=name: finished(n))
        holder["f"] = fetcher
        fetcher.start()
        transport.start()
        devices.append((name, transport, fetcher))
    for name, transport, _ in devices:
        if not transport.wait_connected(20):
            print(json.dumps({"error": f"{name} did not connect"}), flush=True)
            return 1
    time.sleep(0.3)  # the manifest subscriptions are acknowledged
    print("ready", flush=True)
    all_done.wait(args.timeout)
    # Peak memory of this process while receiving (before the files are hashed again below).
    print(json.dumps({"worker_max_rss_mb": peak_rss_mb()}), flush=True)
    for name, transport, fetcher in devices:
        res = fetcher.result
        digest = None
        if res is not None:
            h = hashlib.sha256()
            with res.open("rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            digest = h.hexdigest()
        s = fetcher.stats
        print(json.dumps({"device": name, "done_monotonic": done_at.get(name), "sha256": digest,
                          "error": str(fetcher.error) if fetcher.error else (None if res else "timed out"),
                          "stored": s.stored, "duplicates": s.duplicates, "bad_chunks": s.bad_chunks}), flush=True)
        fetcher.close()
        transport.stop(timeout=1)
    return 0


# -- the parent ------------------------------------------------------------------------------------------

class Cloud:
    def __init__(self, broker: Mosquitto, window: int) -> None:
        self.window = PublishWindow(window)
        self.transport = MqttTransport(BrokerConfig.from_url(broker.url, "cloud-sync"),
                                       on_publish_result=self.window.on_result)
        self.transport.start()
        if not self.transport.wait_connected(10):
            raise RuntimeError("the cloud could not connect")

    def stop(self) -> None:
        self.transport.stop()


def step_publish_only(src: Path, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    with Mosquitto(tmp) as broker:
        cloud = Cloud(broker, args.window)
        try:
            t0 = time.monotonic()
            m = publish_bundle(cloud.transport, src, window=cloud.window, name="bench", version="1")
            seconds = time.monotonic() - t0
        finally:
            cloud.stop()
    return {"seconds": round(seconds, 3), "chunks": m.count, "chunk_size": m.chunk_size,
            "mb_per_s": round(m.size / 1e6 / seconds, 2), "max_in_flight": cloud.window.stats.max_in_flight}


def step_devices(src: Path, n: int, procs: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    manifest = build_manifest(src, name="bench", version="1")
    with Mosquitto(tmp) as broker:
        per = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
        workers = []
        first = 0
        for count in per:
            if count == 0:
                continue
            cmd = [sys.executable, __file__, "--worker", "--broker", broker.url, "--bundle-id", manifest.bundle_id,
                   "--first", str(first), "--count", str(count), "--dest", str(tmp / "devices"),
                   "--window", str(args.window), "--timeout", str(args.timeout)]
            workers.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
            first += count
        try:
            for w in workers:
                assert w.stdout is not None
                line = w.stdout.readline().strip()
                if line != "ready":
                    raise RuntimeError(f"a worker did not start: {line or w.wait(5)}")
            cloud = Cloud(broker, args.window)
            try:
                t0 = time.monotonic()
                publish_bundle(cloud.transport, src, window=cloud.window, name="bench", version="1")
                published = time.monotonic() - t0
                rows = []
                rss = []
                for w in workers:
                    out, _ = w.communicate(timeout=args.timeout + 60)
                    for obj in (json.loads(x) for x in out.splitlines() if x.strip()):
                        if "worker_max_rss_mb" in obj:
                            rss.append(obj["worker_max_rss_mb"])
                        else:
                            rows.append(obj)
            finally:
                cloud.stop()
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
    errors = [r for r in rows if r.get("error")]
    wrong = [r["device"] for r in rows if not r.get("error") and r.get("sha256") != manifest.sha256]
    times = sorted(r["done_monotonic"] - t0 for r in rows if r.get("done_monotonic") and not r.get("error"))
    last = times[-1] if times and not errors and len(rows) == n else None
    return {
        "devices": n, "procs": len(workers), "publish_seconds": round(published, 3), "worker_max_rss_mb": rss,
        "seconds_to_last_verified": None if last is None else round(last, 3),
        "seconds_to_first_verified": round(times[0], 3) if times else None,
        "seconds_median": round(times[len(times) // 2], 3) if times else None,
        "delivered": len(times), "identical": len(times) - len(wrong), "errors": [r["error"] for r in errors][:5],
        "per_device_mb_per_s": None if last is None else round(manifest.size / 1e6 / last, 2),
        "total_mb_per_s": None if last is None else round(n * manifest.size / 1e6 / last, 2),
        "duplicates": sum(r.get("duplicates", 0) for r in rows),
        "bad_chunks": sum(r.get("bad_chunks", 0) for r in rows),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5 devices (CI)")
    ap.add_argument("--devices", type=int, help="simulated devices (default 50; --quick 5)")
    ap.add_argument("--size-mb", type=float, default=5.0, help="bundle size in MB (default 5)")
    ap.add_argument("--procs", type=int, help="worker processes for the devices (default: CPU cores, at most 4)")
    ap.add_argument("--window", type=int, default=16, help="in-flight publishes (cloud) and chunk requests (device)")
    ap.add_argument("--timeout", type=float, default=120.0, help="give up a step after S seconds")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help=f"raw results (default {DEFAULT_OUT.relative_to(REPO)})")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--broker", help=argparse.SUPPRESS)
    ap.add_argument("--bundle-id", help=argparse.SUPPRESS)
    ap.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--dest", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return run_worker(args)
    n = args.devices or (5 if args.quick else 50)
    procs = max(1, min(args.procs or min(os.cpu_count() or 1, 4), n))
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="[bundle_delivery] %(name)s: %(message)s")
    results: dict[str, Any] = {
        "command": shlex.join([sys.executable, *(sys.argv if argv is None else [__file__, *argv])]),
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine_info(),
        "devices": n, "procs": procs, "quick": args.quick, "window": args.window, "errors": {},
    }
    with tempfile.TemporaryDirectory(prefix="bundle_delivery-") as tmp_s:
        tmp = Path(tmp_s)
        src = tmp / "bundle.tar"
        src.write_bytes(random.Random(7).randbytes(int(args.size_mb * 1e6)))
        m = build_manifest(src, name="bench", version="1")
        results["bundle"] = {"bytes": m.size, "chunks": m.count, "chunk_size": m.chunk_size, "bundle_id": m.bundle_id}
        log(f"{m.size:,} bytes in {m.count} chunks of {m.chunk_size}; {n} devices in {procs} processes")
        steps = [("publish_only", lambda t: step_publish_only(src, args, t)),
                 ("one_device", lambda t: step_devices(src, 1, 1, args, t)),
                 ("fleet", lambda t: step_devices(src, n, procs, args, t))]
        for name, step in steps:
            d = tmp / name
            d.mkdir()
            t0 = time.perf_counter()
            try:
                results[name] = step(d)
                if name != "publish_only" and results[name]["seconds_to_last_verified"] is None:
                    results["errors"][name] = f"not every device got the file: {results[name]['errors']}"
            except Exception as e:
                results["errors"][name] = f"{type(e).__name__}: {e}"
                log(f"{name} failed:\n{traceback.format_exc()}")
            results.setdefault("step_seconds", {})[name] = round(time.perf_counter() - t0, 1)
            log(f"{name}: {results.get(name)}")
    pub, one, fleet = results.get("publish_only", {}), results.get("one_device", {}), results.get("fleet", {})
    last = fleet.get("seconds_to_last_verified")
    results["targets"] = [{"target": f"{n} devices get a {args.size_mb:g} MB bundle in < {TARGET_S:g} s", "value": last,
                           "met": None if last is None else last < TARGET_S}]
    results["finished_utc"] = datetime.now(UTC).isoformat(timespec="seconds")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    b = results["bundle"]
    print(f"\nBundle delivery: {b['bytes'] / 1e6:.1f} MB in {b['chunks']} chunks of {b['chunk_size'] // 1024} KiB, "
          f"Mosquitto defaults ({machine_info()['cpu']}, {machine_info()['cores']} cores)\n")
    rows = [
        ("case", "s to last file", "MB/s per device", "MB/s total", "note"),
        ("publish only (no device)", fmt(pub.get("seconds"), ".2f"), "-", fmt(pub.get("mb_per_s")),
         f"window {args.window}, max in flight {pub.get('max_in_flight', '-')}"),
        ("1 device (baseline)", fmt(one.get("seconds_to_last_verified"), ".2f"), fmt(one.get("per_device_mb_per_s")),
         fmt(one.get("total_mb_per_s")), f"publish {fmt(one.get('publish_seconds'), '.2f')} s, "
         f"worker peak RSS {one.get('worker_max_rss_mb', '-')} MB"),
        (f"{n} devices, {fleet.get('procs', procs)} processes", fmt(last, ".2f"),
         fmt(fleet.get("per_device_mb_per_s")), fmt(fleet.get("total_mb_per_s")),
         f"first {fmt(fleet.get('seconds_to_first_verified'), '.2f')} s, median "
         f"{fmt(fleet.get('seconds_median'), '.2f')} s; identical {fleet.get('identical', '-')}/{n}, "
         f"duplicates {fleet.get('duplicates', '-')}, bad {fleet.get('bad_chunks', '-')}; "
         f"worker peak RSS {fleet.get('worker_max_rss_mb', '-')} MB"),
    ]
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    for r in rows:
        print("  " + "  ".join(f"{r[i]:<{widths[i]}}" if i == 0 else f"{r[i]:>{widths[i]}}" for i in range(4))
              + f"  {r[4]}")
    print("\nTargets (information only):")
    for t in results["targets"]:
        verdict = "n/a " if t["met"] is None else ("PASS" if t["met"] else "FAIL")
        print(f"  {verdict}  {t['target']}: {fmt(t['value'], '.2f')} s")
    if results["errors"]:
        print(f"\nFailed steps: {', '.join(results['errors'])}")
    print(f"\nRaw results: {args.out}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
