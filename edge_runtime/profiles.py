"""Device profiles (``devices/*.toml``): how to build an onnxruntime session on a kind of device.

A profile names execution providers in preference order, thread counts, spinning, the memory arena
and the graph optimisation level. ``edge-runtime --profile NAME`` picks one; without it the agent
matches this machine (``/proc/device-tree/model``, CPU architecture) against each profile's
``[match]`` table.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.config import TomlDoc, check_table, choice, require
from edge_runtime.errors import ConfigError

log = logging.getLogger(__name__)

GRAPH_OPTIMIZATION = ("disable", "basic", "extended", "layout", "all")
ARENA_STRATEGIES = ("next_power_of_two", "same_as_requested")
EXECUTION_MODES = ("sequential", "parallel")

_TOP = {"name": str, "description": str, "match": dict, "session": dict, "provider_options": dict}
_MATCH = {"machine": list, "model": list}
_SESSION = {
    "providers": list, "strict_providers": bool, "intra_op_threads": int, "inter_op_threads": int,
    "allow_spinning": bool, "memory_arena": bool, "arena_extend_strategy": str,
    "graph_optimization": str, "execution_mode": str, "io_binding": bool,
}


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    path: str
    description: str = ""
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    provider_options: dict[str, dict[str, str]] = field(default_factory=dict)
    strict_providers: bool = False
    intra_op_threads: int = 0  # 0: onnxruntime's default (one per physical core)
    inter_op_threads: int = 0
    allow_spinning: bool = False
    memory_arena: bool = True
    arena_extend_strategy: str = "same_as_requested"
    graph_optimization: str = "all"
    execution_mode: str = "sequential"
    io_binding: bool = True  # pre-bound output buffers on the hot path (verified per model at load)
    match_machine: tuple[str, ...] = ()
    match_model: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "path": self.path, "providers": list(self.providers),
            "strict_providers": self.strict_providers, "intra_op_threads": self.intra_op_threads,
            "inter_op_threads": self.inter_op_threads, "allow_spinning": self.allow_spinning,
            "memory_arena": self.memory_arena, "arena_extend_strategy": self.arena_extend_strategy,
            "graph_optimization": self.graph_optimization, "execution_mode": self.execution_mode,
            "io_binding": self.io_binding,
        }


def parse_profile(path: str | Path) -> DeviceProfile:
    doc = TomlDoc.load(path)
    d = doc.data
    check_table(doc, d, _TOP)
    name = require(doc, d, "name")
    match = d.get("match", {})
    check_table(doc, match, _MATCH, ("match",))
    s = d.get("session", {})
    check_table(doc, s, _SESSION, ("session",))
    for key in ("machine", "model"):
        if not all(isinstance(v, str) for v in match.get(key, [])):
            raise doc.error(f"key '{key}' in [match] must be an array of strings", ("match",), key)
    providers = s.get("providers", ["CPUExecutionProvider"])
    if not providers or not all(isinstance(p, str) and p.endswith("ExecutionProvider") for p in providers):
        raise doc.error("key 'providers' must be a non-empty array of provider names such as "
                        f"\"CPUExecutionProvider\", got {providers!r}", ("session",), "providers")
    for key in ("intra_op_threads", "inter_op_threads"):
        if s.get(key, 0) < 0:
            raise doc.error(f"key '{key}' must be >= 0 (0 = onnxruntime's default), got {s[key]}",
                            ("session",), key)
    opts: dict[str, dict[str, str]] = {}
    for prov, table in d.get("provider_options", {}).items():
        if not isinstance(table, dict):
            raise doc.error(f"[provider_options.{prov}] must be a table", ("provider_options",), prov)
        for k, v in table.items():
            if not isinstance(v, str | int | float | bool):
                raise doc.error(f"provider option '{k}' must be a string, number or boolean",
                                ("provider_options", prov), k)
        opts[prov] = {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in table.items()}
    return DeviceProfile(
        name=name,
        path=str(path),
        description=d.get("description", ""),
        providers=tuple(providers),
        provider_options=opts,
        strict_providers=s.get("strict_providers", False),
        intra_op_threads=s.get("intra_op_threads", 0),
        inter_op_threads=s.get("inter_op_threads", 0),
        allow_spinning=s.get("allow_spinning", False),
        memory_arena=s.get("memory_arena", True),
        arena_extend_strategy=choice(doc, s.get("arena_extend_strategy", "same_as_requested"),
                                     ARENA_STRATEGIES, "arena_extend_strategy", ("session",)),
        graph_optimization=choice(doc, s.get("graph_optimization", "all"), GRAPH_OPTIMIZATION,
                                  "graph_optimization", ("session",)),
        execution_mode=choice(doc, s.get("execution_mode", "sequential"), EXECUTION_MODES,
                              "execution_mode", ("session",)),
        io_binding=s.get("io_binding", True),
        match_machine=tuple(match.get("machine", [])),
        match_model=tuple(match.get("model", [])),
    )


def profile_dirs() -> list[Path]:
    """Where profiles are looked up, first match wins: $EDGE_RUNTIME_PROFILES, /etc/edge-runtime/devices,
    the copy inside the installed package, the repository's devices/ (editable installs)."""
    dirs = []
    if os.environ.get("EDGE_RUNTIME_PROFILES"):
        dirs.append(Path(os.environ["EDGE_RUNTIME_PROFILES"]))
    here = Path(__file__).resolve().parent
    dirs += [Path("/etc/edge-runtime/devices"), here / "_devices", here.parent / "devices"]
    return [d for d in dirs if d.is_dir()]


def available_profiles() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in profile_dirs():
        for p in sorted(d.glob("*.toml")):
            if p.name.endswith(".example.toml"):  # the agent's example configuration lives beside the profiles
                continue
            found.setdefault(p.stem, p)
    return found


def load_profile(name_or_path: str) -> DeviceProfile:
    """A profile by name (``rpi4``) or by path (``./my-board.toml``)."""
    if name_or_path.endswith(".toml") or os.sep in name_or_path:
        if not Path(name_or_path).is_file():
            raise ConfigError("device profile file not found", path=name_or_path)
        return parse_profile(name_or_path)
    profiles = available_profiles()
    if name_or_path not in profiles:
        known = ", ".join(sorted(profiles)) or "none found"
        raise ConfigError(f"unknown device profile '{name_or_path}' (available: {known}; "
                          f"searched {', '.join(str(d) for d in profile_dirs())})")
    return parse_profile(profiles[name_or_path])


def read_board_model() -> str:
    """The board's model string from the device tree (Raspberry Pi, Jetson), '' elsewhere."""
    for p in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        try:
            return Path(p).read_bytes().rstrip(b"\0").decode("utf-8", "replace")
        except OSError:
            continue
    return ""


def detect_profile(board_model: str | None = None, machine: str | None = None) -> DeviceProfile:
    """Best-matching profile for this machine: a board-model match beats an architecture-only match."""
    board_model = read_board_model() if board_model is None else board_model
    machine = platform.machine() if machine is None else machine
    best: tuple[int, DeviceProfile] | None = None
    for path in available_profiles().values():
        prof = parse_profile(path)
        if prof.match_machine and machine not in prof.match_machine:
            continue
        if prof.match_model:
            if not any(m.lower() in board_model.lower() for m in prof.match_model):
                continue
            score = 2
        elif prof.match_machine:
            score = 1
        else:
            continue
        if best is None or score > best[0]:
            best = (score, prof)
    if best is not None:
        log.info("device profile %s detected (board %r, machine %s)", best[1].name, board_model, machine)
        return best[1]
    fallback = load_profile("generic")
    log.warning("no device profile matches board %r on %s; using %s (pass --profile to choose)",
                board_model, machine, fallback.name)
    return fallback
