"""What the model build scripts share: their command line, logging, and loading each other by path.

models/ holds scripts, not a package: each script puts this folder on sys.path to import this file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent


def logger(prefix: str) -> Callable[[str], None]:
    def log(msg: str) -> None:
        print(f"[{prefix}] {msg}", file=sys.stderr)

    return log


def load_script(name: str) -> ModuleType:
    """Import models/<name>.py by path."""
    spec = importlib.util.spec_from_file_location(f"edge_models_{name}", HERE / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {HERE / name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_main(build: Callable[[Path], dict[str, Any]], doc: str | None, prefix: str,
             argv: list[str] | None = None, default_out: Path | None = None) -> int:
    """Build into --out, log to stderr, print one JSON line (the summary) to stdout."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    if default_out is None:
        parser.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    else:
        parser.add_argument("--out", type=Path, default=default_out,
                            help=f"output directory (default {default_out})")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    summary = build(args.out)
    logger(prefix)(f"built in {time.perf_counter() - start:.2f} s -> {args.out}")
    print(json.dumps(summary))
    return 0
