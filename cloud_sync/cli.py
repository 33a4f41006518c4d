"""`cloud-sync ...`: the fleet side (ingest, dashboard, alerts, rollouts); commands come later."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from edge_runtime import __version__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cloud-sync",
        description="Cloud counterpart of edge-runtime: fleet view, dashboard, alerts, review queue and "
                    "model rollouts over MQTT. This version has no commands yet; it prints this help.",
    )
    p.add_argument("--version", action="version", version=f"cloud-sync {__version__}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    build_parser().parse_args(argv)
    build_parser().print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
