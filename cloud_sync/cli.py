"""`cloud-sync ...`: the fleet side. `serve` ingests device records over MQTT into a store and acks them."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

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
    s.add_argument("--db", default="cloud-sync.db", metavar="PATH", help="SQLite store (default cloud-sync.db)")
    s.add_argument("--client-id", default="cloud-sync", metavar="ID")
    s.add_argument("--group", default="ingest", help="MQTT 5 shared-subscription group (default ingest)")
    s.add_argument("--stats-interval", type=float, default=30.0, metavar="S",
                   help="log ingest counters every S seconds (0: never)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


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
    svc = IngestService(url, args.db, client_id=args.client_id, group=args.group)
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
        svc.stop()
        if broker is not None:
            broker.stop()
        log.info("stopped: %s", json.dumps(stats))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    from edge_runtime.errors import EdgeRuntimeError

    try:
        return {"serve": cmd_serve}[args.command](args)
    except EdgeRuntimeError as e:
        log.error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
