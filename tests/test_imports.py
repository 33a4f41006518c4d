"""The agent's core stays small: importing it must not pull in optional or heavy libraries."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("cv2", "onnx", "skl2onnx", "sklearn", "nacl", "scipy", "starlette", "fastapi", "flask", "uvicorn",
         "aiohttp", "jinja2", "matplotlib", "torch")


def loaded_after(statement: str) -> set[str]:
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {m.split(".")[0] for m in json.loads(out.stdout)}


@pytest.mark.parametrize("statement", [
    "import edge_runtime",
    "import edge_runtime.cli",
    "from edge_runtime.adapters import onnx_engine",
    "import edge_runtime.pipeline, edge_runtime.runtime, edge_runtime.bench, edge_runtime.bundle",
    "import edge_runtime.quantize, edge_runtime.core.choose",
])
def test_agent_imports_no_optional_library(statement: str) -> None:
    heavy = loaded_after(statement) & set(HEAVY)
    assert not heavy, f"`{statement}` imported {sorted(heavy)}"


@pytest.mark.parametrize("statement", [
    "import edge_runtime.core.spec, edge_runtime.core.histogram, edge_runtime.core.preprocess, "
    "edge_runtime.core.inputs, edge_runtime.core.metrics, edge_runtime.core.protocol",
    "import cloud_sync, cloud_sync.cli, cloud_sync.service",
])
def test_core_and_cloud_do_not_load_onnxruntime_or_opencv(statement: str) -> None:
    mods = loaded_after(statement)
    assert "onnxruntime" not in mods
    assert "cv2" not in mods


# onnxruntime's sessions live in onnx_engine; its quantization tools, which need the onnx package (models
# extra), in onnx_tools, so that a device without the extra still loads the engine.
@pytest.mark.parametrize(("module", "owners"), [("onnxruntime", ["adapters/onnx_engine.py", "adapters/onnx_tools.py"]),
                                                ("onnx", ["adapters/onnx_tools.py"]),
                                                ("cv2", ["adapters/cv2_source.py"]),
                                                ("nacl", ["adapters/ed25519.py"]),
                                                ("paho", ["adapters/mqtt_transport.py"]),
                                                ("sqlite3", ["adapters/sqlite_buffer.py"])])
def test_each_outside_library_is_imported_by_one_adapter(module: str, owners: list[str]) -> None:
    root = Path(__file__).resolve().parent.parent / "edge_runtime"
    pattern = re.compile(rf"^\s*(import {module}\b|from {module}\b)", re.MULTILINE)
    users = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                   if pattern.search(p.read_text()))
    assert users == owners
