"""The model build scripts in models/ produce loadable, correctly shaped ONNX models.

models/ is not a package, so the scripts are loaded by path. Each module-scoped fixture
builds once into a temporary directory and the tests inspect the outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import load_script

pytestmark = pytest.mark.integration



def session(path: Path) -> Any:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("digits")
    return out, load_script("build_digits_mlp").build(out)


@pytest.fixture(scope="module")
def cnn_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("cnn")
    return out, load_script("build_cnn").build(out)


@pytest.fixture(scope="module")
def fixtures_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fixtures")
    load_script("build_test_models").build(out)
    return out


def test_digits_files_and_accuracy(digits_dir: tuple[Path, dict[str, Any]]) -> None:
    out, summary = digits_dir
    for name in ("digits_mlp.onnx", "digits_mlp.test_x.npy", "digits_mlp.test_y.npy", "digits_mlp.json"):
        assert (out / name).is_file(), name
    x = np.load(out / "digits_mlp.test_x.npy")
    y = np.load(out / "digits_mlp.test_y.npy")
    assert x.dtype == np.float32
    assert x.shape[1] == 64
    assert y.dtype == np.int64
    assert x.min() >= 0 and x.max() <= 16  # raw pixels: the scaler lives inside the model

    sess = session(out / "digits_mlp.onnx")
    assert [i.name for i in sess.get_inputs()] == ["input"]
    assert [o.name for o in sess.get_outputs()] == ["label", "probabilities"]
    label, proba = sess.run(None, {"input": x})
    assert label.dtype == np.int64
    assert proba.shape == (len(x), 10)
    accuracy = float(np.mean(label == y))
    assert accuracy >= 0.9

    recorded = json.loads((out / "digits_mlp.json").read_text())
    assert recorded["onnx_test_accuracy"] == pytest.approx(accuracy)
    assert recorded["n_test"] == len(x)
    assert summary["onnx_test_accuracy"] == pytest.approx(accuracy)


def test_cnn_metadata_and_shapes(cnn_dir: tuple[Path, dict[str, Any]]) -> None:
    out, summary = cnn_dir
    for name in ("cnn.onnx", "cnn.sample_x.npy", "cnn.json"):
        assert (out / name).is_file(), name
    assert summary["trained"] is False
    assert json.loads((out / "cnn.json").read_text())["trained"] is False

    sess = session(out / "cnn.onnx")
    meta = sess.get_modelmeta().custom_metadata_map
    preprocess = json.loads(meta["edge_runtime.preprocess"])
    assert preprocess == {
        "resize": [64, 64],
        "color": "RGB",
        "layout": "NCHW",
        "scale": pytest.approx(1 / 255),
        "dtype": "float32",
    }
    (inp,) = sess.get_inputs()
    assert inp.name == "image"
    assert inp.shape == ["batch", 3, 64, 64]

    frames = np.load(out / "cnn.sample_x.npy")
    assert frames.dtype == np.uint8
    assert frames.shape == (8, 64, 64, 3)
    x = (frames.astype(np.float32) * np.float32(preprocess["scale"])).transpose(0, 3, 1, 2)
    (proba,) = sess.run(["probabilities"], {"image": np.ascontiguousarray(x)})
    assert proba.shape == (8, 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-4)


def test_multi_input_signature(fixtures_dir: Path) -> None:
    sess = session(fixtures_dir / "multi_input.onnx")
    inputs = {i.name: (i.type, i.shape) for i in sess.get_inputs()}
    assert inputs == {
        "tokens": ("tensor(int64)", ["batch", "seq"]),
        "mask": ("tensor(bool)", ["batch", "seq"]),
        "temperature": ("tensor(float)", []),
        "h0": ("tensor(float)", [1, "batch", 16]),
    }
    outputs = {o.name: (o.type, o.shape) for o in sess.get_outputs()}
    assert outputs == {
        "out": ("tensor(float)", ["batch", 16]),
        "h1": ("tensor(float)", [1, "batch", 16]),
    }

    rng = np.random.default_rng(1)
    batch, seq = 2, 7
    feed = {
        "tokens": np.array([[0, 99, 5, 50, 1, 98, 3], [7, 7, 7, 7, 7, 7, 7]], np.int64),
        "mask": rng.random((batch, seq)) < 0.5,
        "temperature": np.array(2.0, np.float32),
        "h0": rng.standard_normal((1, batch, 16)).astype(np.float32),
    }
    out, h1 = sess.run(None, feed)
    assert out.shape == (batch, 16)
    assert h1.shape == (1, batch, 16)
    # Every input matters: perturbing any one changes the output.
    for name, changed in {
        "tokens": (feed["tokens"] + 1) % 100,
        "mask": ~feed["mask"],
        "temperature": np.array(3.0, np.float32),
        "h0": feed["h0"] + 1,
    }.items():
        other, _ = sess.run(None, {**feed, name: changed})
        assert not np.allclose(other, out), name


def test_fixed_and_no_batch_shapes(fixtures_dir: Path) -> None:
    fixed = session(fixtures_dir / "fixed_shape.onnx")
    assert fixed.get_inputs()[0].shape == [1, 8]
    assert fixed.get_outputs()[0].shape == [1, 4]
    (y,) = fixed.run(None, {"x": np.ones((1, 8), np.float32)})
    assert y.shape == (1, 4)
    assert (y >= 0).all()

    no_batch = session(fixtures_dir / "no_batch.onnx")
    assert no_batch.get_inputs()[0].shape == [8]
    assert no_batch.get_outputs()[0].shape == []
    x = np.arange(8, dtype=np.float32)
    (total,) = no_batch.run(None, {"x": x})
    assert total.shape == ()
    assert float(total) == pytest.approx(28.0)


def test_build_all_builds_everything(tmp_path: Path) -> None:
    results = load_script("build_all").build(tmp_path)
    assert set(results) == {"build_digits_mlp", "build_cnn", "build_test_models"}
    expected = {
        "digits_mlp.onnx",
        "cnn.onnx",
        "multi_input.onnx",
        "fixed_shape.onnx",
        "no_batch.onnx",
    }
    assert expected <= {p.name for p in tmp_path.iterdir()}
    for name in expected:
        session(tmp_path / name)
