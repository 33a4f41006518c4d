"""benchmarks/run_all.py: the RESULTS.md section it regenerates (pure text), how it runs one benchmark (its
failure, timeout and stdout-JSON paths, on tiny stand-in commands), and one real ``--quick`` run of the fast
benchmarks end to end (results.json, valid PNGs, a RESULTS.md written into tmp_path), so it cannot rot.
The other benchmarks have their own smoke tests. Figures are not judged."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

sys.path.insert(0, str(ROOT / "benchmarks"))
import run_all  # noqa: E402 - benchmarks/ holds scripts, not a package

SCRIPT = ROOT / "benchmarks" / "run_all.py"
INTRO = "# Benchmark results\n\nHow these figures are measured.\n\n"
REST = "## Loop overhead\n\nHand-written | with a table.\n\n## Sync\n\nMore text.\n"


def section(body: str = "new") -> str:
    return f"{run_all.BEGIN}\n## All benchmarks\n\n{body}\n{run_all.END}\n"


# -- the RESULTS.md section ------------------------------------------------------------------------------


def test_section_goes_after_the_introduction_when_absent() -> None:
    out = run_all.replace_section(INTRO + REST, section())
    assert out == INTRO + section() + "\n" + REST


def test_section_replacement_keeps_the_rest_and_is_idempotent() -> None:
    once = run_all.replace_section(INTRO + REST, section("first"))
    twice = run_all.replace_section(once, section("second"))
    assert twice == INTRO + section("second") + "\n" + REST
    assert run_all.replace_section(twice, section("second")) == twice
    assert twice.count(run_all.BEGIN) == twice.count(run_all.END) == 1


def test_section_in_the_middle_is_replaced_in_place() -> None:
    text = INTRO + "## Before\n\nx\n\n" + section("old") + "\n" + REST
    assert run_all.replace_section(text, section("new")) == INTRO + "## Before\n\nx\n\n" + section("new") + "\n" + REST


def test_section_is_appended_to_a_file_without_headings() -> None:
    assert run_all.replace_section("# Title\n", section()) == "# Title\n\n" + section()
    assert run_all.replace_section("", section()) == section()


@pytest.mark.parametrize("broken", [
    INTRO + run_all.BEGIN + "\nno end\n" + REST,
    INTRO + run_all.END + "\n" + run_all.BEGIN + "\n" + REST,
    INTRO + section() + section(),
])
def test_broken_markers_are_refused_not_guessed(broken: str) -> None:
    with pytest.raises(ValueError, match="marker"):
        run_all.replace_section(broken, section())


def test_a_section_without_markers_is_refused() -> None:
    with pytest.raises(ValueError, match="starts with"):
        run_all.replace_section(INTRO, "## no markers\n")


# -- settings and commands -------------------------------------------------------------------------------


def test_names_accept_script_stems_and_reject_unknown_ones() -> None:
    assert run_all.resolve_names("drift_bench, sync,escalation_curve") == ["drift", "sync", "escalation"]
    assert run_all.resolve_names(None) == []
    with pytest.raises(ValueError, match=r"unknown benchmark 'nope'.*loop_overhead"):
        run_all.resolve_names("loop_overhead,nope")
    names = [b.name for b in run_all.select(["soak", "drift"], [])]
    assert names == ["drift", "soak"]  # the registry's order, not the command line's
    assert "fleet" not in [b.name for b in run_all.select([], ["fleet"])]


def test_every_benchmark_script_exists_and_quick_runs_get_the_smoke_settings() -> None:
    for b in run_all.BENCHMARKS:
        assert (ROOT / "benchmarks" / b.script).is_file(), b.script
        assert b.name in run_all.HEADLINES
    soak = next(b for b in run_all.BENCHMARKS if b.name == "soak")
    quick = run_all.settings_args(soak, quick=True)
    assert quick[:3] == ["--quick", "--minutes", "0.75"]
    assert run_all.settings_args(soak, quick=True, soak_minutes=2)[:3] == ["--quick", "--minutes", "2"]
    assert run_all.settings_args(soak, quick=False) == ["--minutes", "10"]
    assert run_all.timeout_for(soak, False, ["--minutes", "10"]) == 10 * 60 + 900
    fleet = next(b for b in run_all.BENCHMARKS if b.name == "fleet")
    assert run_all.settings_args(fleet, quick=True, fleet_devices="10,20") == ["--quick", "--devices", "10,20"]


def test_commands_pass_paths_only_to_scripts_that_take_them(tmp_path: Path) -> None:
    by = {b.name: b for b in run_all.BENCHMARKS}
    cmd = run_all.bench_command(by["hot_swap"], ["--json"], tmp_path / "h.json", tmp_path / "m")
    assert "--out" not in cmd and cmd[-2:] == ["--models-dir", str(tmp_path / "m")]
    cmd = run_all.bench_command(by["sync"], ["--quick"], tmp_path / "s.json", tmp_path / "m")
    assert "--models-dir" not in cmd and cmd[-2:] == ["--out", str(tmp_path / "s.json")]
    assert cmd[0] == sys.executable


def test_cpu_flags_from_x86_and_arm_cpuinfo() -> None:
    assert run_all.cpu_flags("processor\t: 0\nflags\t\t: fpu sse4_2 avx2 fma\n\nflags\t: other\n") == \
        ["fpu", "sse4_2", "avx2", "fma"]
    assert run_all.cpu_flags("processor\t: 0\nFeatures\t: fp asimd crc32 asimddp\n") == \
        ["fp", "asimd", "crc32", "asimddp"]
    assert run_all.cpu_flags("nothing here\n") == []


def test_a_benchmark_json_of_an_unexpected_shape_gives_a_note_not_a_crash() -> None:
    rows, notes = run_all.headline_rows({"sync": {"ok": True, "out": {"sync": {}}},
                                         "bundle_verify": {"ok": False, "out": None}})
    assert rows == [] and len(notes) == 1 and notes[0].startswith("sync: no headline figures")


# -- running one benchmark (stand-in commands: fast) ------------------------------------------------------


def stand_in(name: str, stdout_json: bool = False) -> run_all.Bench:
    return run_all.Bench(name, f"{name}.py", "a stand-in", stdout_json=stdout_json)


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_failing_benchmark_is_recorded_with_its_output(tmp_path: Path) -> None:
    rec = run_all.run_benchmark(stand_in("bad"), py("import sys; print('it broke', file=sys.stderr); sys.exit(3)"),
                                tmp_path / "bad.json", tmp_path / "logs" / "bad.log", timeout_s=60)
    assert not rec["ok"] and rec["returncode"] == 3 and not rec["timed_out"] and rec["out"] is None
    assert "exit status 3" in rec["error"] and "it broke" in rec["error"]


def test_a_benchmark_past_its_timeout_is_stopped(tmp_path: Path) -> None:
    rec = run_all.run_benchmark(stand_in("slow"), py("import time; time.sleep(60)"), tmp_path / "slow.json",
                                tmp_path / "slow.log", timeout_s=0.3, progress_every_s=0.1)
    assert not rec["ok"] and rec["timed_out"] and rec["seconds"] < 20 and "timed out" in rec["error"]


def test_json_on_stdout_and_json_in_a_file_are_both_read(tmp_path: Path) -> None:
    rec = run_all.run_benchmark(stand_in("printer", stdout_json=True), py("print('[{\"a\": 1}]')"),
                                tmp_path / "p.json", tmp_path / "p.log", timeout_s=60)
    assert rec["ok"] and rec["out"] == [{"a": 1}]
    out = tmp_path / "w.json"
    out.write_text("stale from an earlier run")
    rec = run_all.run_benchmark(stand_in("writer"), py(f"open({str(out)!r}, 'w').write('{{\"b\": 2}}')"), out,
                                tmp_path / "w.log", timeout_s=60)
    assert rec["ok"] and rec["out"] == {"b": 2}
    rec = run_all.run_benchmark(stand_in("silent"), py("pass"), out, tmp_path / "s.log", timeout_s=60)
    assert not rec["ok"] and "wrote no JSON" in rec["error"]  # the stale file was not taken for its output


# -- one real --quick run --------------------------------------------------------------------------------


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG, after checking its signature and its IHDR chunk's CRC."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13, path
    (crc,) = struct.unpack(">I", data[16 + length:20 + length])
    assert zlib.crc32(data[12:16 + length]) == crc, path
    assert data.rstrip(b"\0").endswith(b"IEND\xaeB`\x82"), path
    return struct.unpack(">II", data[16:24])


def plots_snapshot() -> dict[str, int]:
    folder = ROOT / "benchmarks" / "plots"
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")} if folder.is_dir() else {}


def test_quick_run_of_the_fast_benchmarks(models_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the bench extra (pip install -e '.[bench]')")
    results_md = ROOT / "benchmarks" / "RESULTS.md"
    before = results_md.read_bytes()
    plots_before = plots_snapshot()
    md = tmp_path / "RESULTS.md"
    md.write_text(INTRO + REST)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--only", "loop_overhead,quantize,escalation",
                           "--out-dir", str(out), "--models-dir", str(models_dir), "--results-md", str(md),
                           "--write-results"], capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[1/3] loop_overhead" in proc.stderr and "all ok" in proc.stdout

    r = json.loads((out / "results.json").read_text())
    assert {"machine", "command", "started_utc", "finished_utc", "benchmarks", "plots", "quick"} <= set(r)
    assert r["quick"] and "--quick" in r["command"]
    m = r["machine"]
    assert m["cores"] and m["cpu"] and m["ram_gb"] and m["os"] and m["python"] and m["onnxruntime"]
    assert "CPUExecutionProvider" in m["onnxruntime_providers"] and isinstance(m["cpu_flags"], list)
    assert list(r["benchmarks"]) == ["loop_overhead", "quantize", "escalation"]
    for name, b in r["benchmarks"].items():
        assert b["ok"] and b["returncode"] == 0 and b["seconds"] > 0 and b["error"] is None, name
        assert isinstance(b["out"], dict) and Path(b["log"]).is_file(), name
    assert r["benchmarks"]["loop_overhead"]["out"]["cases"] and r["benchmarks"]["quantize"]["out"]["reports"]

    files = {p["file"] for p in r["plots"]}
    assert {Path(f).name for f in files} == {"latency_cdf.png", "quantize_speedup.png", "escalation_curve.png"}
    for f in files:
        w, h = png_size(Path(f))
        assert w > 300 and h > 200, f

    text = md.read_text()
    assert text.startswith(INTRO) and text.endswith(REST)  # the hand-written parts are kept
    assert text.count(run_all.BEGIN) == text.count(run_all.END) == 1
    assert "| benchmark | figure | value | baseline (same run) | ratio |" in text
    assert "| loop_overhead | digits_mlp b1: agent loop p50 |" in text and "| quantize | cnn: chosen " in text
    assert "](run/plots/latency_cdf.png)" in text  # linked relative to the markdown file
    assert results_md.read_bytes() == before  # --results-md: the repository's file is not touched
    assert plots_snapshot() == plots_before  # a quick run copies no PNG into benchmarks/plots/

    # --replot redraws from results.json alone; a quick run writes no markdown unless asked to.
    md.write_text(INTRO + REST)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--replot", "--out-dir", str(out), "--results-md", str(md)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert md.read_text() == INTRO + REST
    assert run_all.BEGIN in (out / "RESULTS.section.md").read_text()


def test_matplotlib_stays_out_of_the_runtime_packages() -> None:
    code = "import sys, edge_runtime, edge_runtime.cli, cloud_sync, cloud_sync.cli; print('matplotlib' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == "False"
