"""`edge-runtime quantize`: the pure choice rule on made-up tables, then the real tool on the sample
models (digits MLP with labels, the CNN, the awkward multi-input model)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.core.choose import BASELINE, VariantResult, accuracy_drop, choose_variant, find_baseline
from edge_runtime.errors import EdgeRuntimeError, MissingExtraError

VARIANT_KEYS = {"name", "median_us", "p99_us", "speedup", "accuracy", "accuracy_drop_pts", "agreement",
                "max_abs_error", "size_bytes", "path", "error"}


def v(name: str, median: float | None, acc: float | None = None, agree: float | None = None,
      error: str | None = None) -> VariantResult:
    return VariantResult(name, median, acc, agree, error)


# -- the pure rule ------------------------------------------------------------------------------


def test_picks_the_fastest_variant_within_the_drop() -> None:
    table = [v("fp32", 100, 97.0), v("int8-dynamic", 80, 96.8), v("int8-static", 50, 96.5),
             v("fp32-opt", 95, 97.0)]
    c = choose_variant(table, max_accuracy_drop_pts=1.0, min_speedup=1.05)
    assert c.name == "int8-static"
    assert c.speedup == pytest.approx(2.0)
    assert c.accuracy_drop_pts == pytest.approx(0.5)
    assert c.reason.startswith("int8-static: 2.00x faster") and "-0.50 pts" in c.reason


def test_rejects_a_faster_variant_beyond_the_drop() -> None:
    table = [v("fp32", 100, 97.0), v("int8-static", 40, 94.0), v("int8-static-perchannel", 60, 96.5)]
    c = choose_variant(table, max_accuracy_drop_pts=1.0, min_speedup=1.05)
    assert c.name == "int8-static-perchannel"


@pytest.mark.parametrize("medians", [[120.0, 150.0], [99.0, 97.0], [100.0, 100.0]])
def test_keeps_fp32_when_nothing_is_clearly_faster(medians: list[float]) -> None:
    table = [v("fp32", 100, 97.0)] + [v(f"v{i}", m, 97.0) for i, m in enumerate(medians)]
    c = choose_variant(table, max_accuracy_drop_pts=1.0, min_speedup=1.05)
    assert (c.name, c.speedup, c.accuracy_drop_pts) == (BASELINE, 1.0, 0.0)
    assert c.reason.startswith("kept fp32: no variant at least 1.05x faster within 1 pts")


def test_a_min_speedup_below_one_never_picks_a_slower_variant() -> None:
    c = choose_variant([v("fp32", 100, 97.0), v("int8", 150, 97.0)], 1.0, min_speedup=0.5)
    assert c.name == BASELINE


def test_never_chooses_a_failed_variant() -> None:
    table = [v("fp32", 100, 97.0), v("int8-static", 10, 97.0, error="build failed: boom"),
             v("int8-dynamic", None, 97.0), v("fp32-opt", 90, 97.0)]
    c = choose_variant(table, 1.0, 1.05)
    assert c.name == "fp32-opt"
    assert choose_variant(table[:3], 1.0, 1.05).name == BASELINE
    assert "int8-static failed" in choose_variant(table[:3], 1.0, 1.05).reason


def test_without_labels_agreement_with_fp32_decides() -> None:
    table = [v("fp32", 100, agree=100.0), v("int8-static", 40, agree=98.5),
             v("int8-static-perchannel", 50, agree=99.5), v("int8-dynamic", 30)]  # unknown: never chosen
    c = choose_variant(table, max_accuracy_drop_pts=1.0, min_speedup=1.05)
    assert c.name == "int8-static-perchannel"
    assert c.accuracy_drop_pts == pytest.approx(0.5)
    assert choose_variant(table, max_accuracy_drop_pts=2.0, min_speedup=1.05).name == "int8-static"


def test_fp32_must_be_measured() -> None:
    with pytest.raises(ValueError, match="fp32"):
        choose_variant([v("int8", 10, 97.0)], 1.0, 1.05)
    with pytest.raises(ValueError, match="fp32"):
        choose_variant([v("fp32", None, error="load failed")], 1.0, 1.05)


@st.composite
def tables(draw: Any) -> list[VariantResult]:
    labelled = draw(st.booleans())
    pct = st.floats(0, 100, allow_nan=False)
    base = VariantResult(BASELINE, draw(st.floats(1, 1e6)), draw(pct) if labelled else None, 100.0)
    others = [VariantResult(f"v{i}", draw(st.none() | st.floats(0.01, 2e6)),
                            draw(st.none() | pct) if labelled else None, draw(st.none() | pct),
                            draw(st.none() | st.just("failed")))
              for i in range(draw(st.integers(0, 6)))]
    order = draw(st.permutations([base, *others]))
    return list(order)


@settings(max_examples=300, deadline=None)
@given(tables(), st.floats(0, 20), st.floats(0.1, 3))
def test_the_choice_is_never_slower_than_fp32_nor_beyond_the_drop(table: list[VariantResult], limit: float,
                                                                   min_speedup: float) -> None:
    c = choose_variant(table, limit, min_speedup)
    chosen = next(x for x in table if x.name == c.name)
    base = find_baseline(table)
    assert chosen.error is None and chosen.median_us is not None
    assert chosen.median_us <= base.median_us  # type: ignore[operator]
    drop = accuracy_drop(chosen, base)
    assert drop is not None and drop <= limit + 1e-9
    if c.name != BASELINE:
        assert c.speedup >= max(min_speedup, 1.0) - 1e-9


# -- the real tool ------------------------------------------------------------------------------


def quantize_cli(*args: str) -> int:
    """The `quantize` subcommand as cli.main runs it, built by the module's own add_parser."""
    from edge_runtime import quantize

    parser = argparse.ArgumentParser(prog="edge-runtime")
    quantize.add_parser(parser.add_subparsers(dest="command"))
    return quantize.cmd_quantize(parser.parse_args(["quantize", *args]))


def _report(out: Path) -> dict[str, Any]:
    r = json.loads((out / "quantize_report.json").read_text())
    for key in ("model", "profile", "providers", "machine", "onnxruntime", "calibration", "eval",
                "preprocess", "variants", "chosen"):
        assert key in r, key
    for row in r["variants"]:
        assert set(row) >= VARIANT_KEYS
    names = {row["name"]: row for row in r["variants"]}
    chosen = names[r["chosen"]["name"]]
    assert chosen["error"] is None and chosen["speedup"] >= 1.0
    assert (out / "model.onnx").read_bytes() == Path(chosen["path"]).read_bytes()
    for row in r["variants"]:
        if row["error"] is None:
            assert Path(row["path"]) == out / "variants" / f"{row['name']}.onnx" and Path(row["path"]).is_file()
            assert row["median_us"] > 0 and row["size_bytes"] > 0
    return r


def _cnn_calibration(models_dir: Path, tmp_path: Path) -> Path:
    frames = np.load(models_dir / "cnn.sample_x.npy")  # uint8 HWC camera frames (BGR)
    x = (frames[..., ::-1].astype(np.float32) / 255.0).transpose(0, 3, 1, 2)
    noise = np.random.default_rng(0).random((40, 3, 64, 64), dtype=np.float32)
    path = tmp_path / "cnn_calib.npy"
    np.save(path, np.ascontiguousarray(np.concatenate([x, noise])))
    return path


@pytest.mark.integration
def test_digits_with_labels(models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q"
    rc = quantize_cli("--model", str(models_dir / "digits_mlp.onnx"),
                      "--calibration", str(models_dir / "digits_mlp.test_x.npy"),
                      "--labels", str(models_dir / "digits_mlp.test_y.npy"), "--out", str(out),
                      "--profile", "x86-generic", "--seconds", "0.2", "--warmup", "0.05", "--json")
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    r = _report(out)
    assert printed == r
    assert r["accuracy_basis"] == "labels" and r["eval"]["path"] == "calibration data"
    assert r["calibration"]["samples"] == 200 and r["eval"]["samples"] == 450
    rows = {row["name"]: row for row in r["variants"]}
    assert set(rows) == {"fp32", "fp32-opt", "int8-dynamic", "int8-static", "int8-static-perchannel",
                         "int8-static-perchannel-body"}
    assert rows["fp32"]["accuracy"] > 90 and rows["fp32"]["speedup"] == 1.0
    assert rows["fp32"]["agreement"] == 100.0 and rows["fp32"]["max_abs_error"] == 0.0
    for row in rows.values():
        assert row["error"] is None, row
        assert row["accuracy_drop_pts"] == pytest.approx(rows["fp32"]["accuracy"] - row["accuracy"], abs=1e-2)
    assert rows["int8-static"]["size_bytes"] < rows["fp32"]["size_bytes"]


@pytest.mark.integration
def test_cnn_quantizes_and_never_chooses_a_slower_variant(models_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q"
    # Evaluation on raw camera frames: the model's own preprocessing (metadata) is applied to them.
    assert quantize_cli("--model", str(models_dir / "cnn.onnx"),
                        "--calibration", str(_cnn_calibration(models_dir, tmp_path)), "--out", str(out),
                        "--eval", str(models_dir / "cnn.sample_x.npy"),
                        "--profile", "x86-generic", "--seconds", "0.5", "--warmup", "0.1") == 0
    table = capsys.readouterr().out
    r = _report(out)
    assert r["accuracy_basis"] == "agreement with fp32" and r["timing"]["shapes"] == {"image": [1, 3, 64, 64]}
    assert r["calibration"]["preprocessed"] is False and r["eval"]["preprocessed"] is True
    rows = {row["name"]: row for row in r["variants"]}
    assert "fp16" not in rows  # CPU profile, no --fp16
    assert rows["int8-static"]["error"] is None and rows["int8-static"]["agreement"] is not None
    assert r["chosen"]["name"] in table and "chosen" in table
    # The chosen model keeps the preprocessing spec the runtime reads from the model's metadata.
    from edge_runtime.adapters.onnx_engine import OnnxEngine
    from edge_runtime.profiles import load_profile

    assert "edge_runtime.preprocess" in OnnxEngine(out / "model.onnx", load_profile("x86-generic")).metadata


@pytest.mark.integration
def test_multi_input_model_does_not_crash(models_dir: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n, batch, seq = 20, 1, 5  # the model is not batchable (scalar temperature): rows are whole feeds
    calib = tmp_path / "mi.npz"
    np.savez(calib, tokens=rng.integers(0, 100, (n, batch, seq)), mask=rng.random((n, batch, seq)) < 0.7,
             temperature=np.full(n, 0.5, np.float32),
             h0=rng.standard_normal((n, 1, batch, 16)).astype(np.float32))
    out = tmp_path / "q"
    assert quantize_cli("--model", str(models_dir / "multi_input.onnx"), "--calibration", str(calib),
                        "--out", str(out), "--profile", "x86-generic", "--seconds", "0.1",
                        "--warmup", "0.02", "--fp16") == 0
    r = _report(out)
    rows = {row["name"]: row for row in r["variants"]}
    assert "fp16" in rows and rows["fp32"]["error"] is None
    for row in rows.values():
        assert row["error"] is None or isinstance(row["error"], str)


@pytest.mark.integration
def test_failed_steps_are_recorded_not_fatal(models_dir: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_runtime.adapters import onnx_tools

    def boom(*_: Any, **__: Any) -> None:
        raise RuntimeError("unsupported op in this graph")

    monkeypatch.setattr(onnx_tools, "preprocess", boom)
    monkeypatch.setattr(onnx_tools, "quantize_int8_dynamic", boom)
    out = tmp_path / "q"
    assert quantize_cli("--model", str(models_dir / "digits_mlp.onnx"),
                        "--calibration", str(models_dir / "digits_mlp.test_x.npy"), "--out", str(out),
                        "--profile", "x86-generic", "--seconds", "0.05", "--warmup", "0.01") == 0
    r = _report(out)
    assert r["preprocess"]["ok"] is False and "unsupported op" in r["preprocess"]["error"]
    rows = {row["name"]: row for row in r["variants"]}
    dyn = rows["int8-dynamic"]
    assert dyn["error"].startswith("build failed: RuntimeError: unsupported op")
    assert dyn["path"] is None and dyn["median_us"] is None and dyn["speedup"] is None
    assert not (out / "variants" / "int8-dynamic.onnx").exists()
    assert rows["int8-static"]["error"] is None and rows["int8-static"]["built_from"] == "original"
    assert r["chosen"]["name"] != "int8-dynamic"


@pytest.mark.integration
def test_calibration_data_must_match_the_model(models_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((4, 63), np.float32))
    with pytest.raises(EdgeRuntimeError, match=r"bad\.npy row 0: .*shape"):
        quantize_cli("--model", str(models_dir / "digits_mlp.onnx"), "--calibration", str(bad),
                     "--out", str(tmp_path / "q"), "--profile", "x86-generic")
    with pytest.raises(EdgeRuntimeError, match=r"\.npz"):
        quantize_cli("--model", str(models_dir / "multi_input.onnx"), "--calibration", str(bad),
                     "--out", str(tmp_path / "q"), "--profile", "x86-generic")


def test_missing_models_extra_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import edge_runtime.adapters
    from edge_runtime import quantize

    monkeypatch.delattr(edge_runtime.adapters, "onnx_tools", raising=False)
    monkeypatch.setitem(sys.modules, "edge_runtime.adapters.onnx_tools", None)
    with pytest.raises(MissingExtraError, match=r"quantize needs the 'models' extra \(onnx"):
        quantize._tools()


def test_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        quantize_cli("--help")
    out = capsys.readouterr().out
    for opt in ("--model", "--calibration", "--out", "--profile", "--input-shape", "--dim",
                "--max-accuracy-drop", "--labels", "--eval", "--seconds", "--min-speedup", "--json",
                "--log-level", "--calibration-samples", "--fp16", "--quantize-ops", "--eval-samples"):
        assert opt in out
