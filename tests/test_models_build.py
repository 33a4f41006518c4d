"""The model build scripts in models/ produce loadable, correctly shaped ONNX models.

models/ is not a package, so the scripts are loaded by path. One module-scoped build_all run
into a temporary directory feeds every test (building each script again would cost ~10 s more).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edge_runtime.core.preprocess import Preprocessor, PreprocessSpec
from tests.conftest import load_script

pytestmark = pytest.mark.integration

Built = tuple[Path, dict[str, Any]]


def session(path: Path) -> Any:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    out = tmp_path_factory.mktemp("all_models")
    return out, load_script("build_all").build(out)


@pytest.fixture(scope="module")
def digits_dir(built: Built) -> Built:
    return built[0], built[1]["build_digits_mlp"]


@pytest.fixture(scope="module")
def tabular_dir(built: Built) -> Built:
    return built[0], built[1]["build_tabular"]


@pytest.fixture(scope="module")
def cnn_dir(built: Built) -> Built:
    return built[0], built[1]["build_cnn"]


@pytest.fixture(scope="module")
def fixtures_dir(built: Built) -> Path:
    return built[0]


def test_digits_files_and_accuracy(digits_dir: Built) -> None:
    out, summary = digits_dir
    for suffix in (".onnx", ".train_x.npy", ".test_x.npy", ".test_y.npy", ".json"):
        name = f"digits_mlp{suffix}"
        assert (out / name).is_file(), name
    train_x = np.load(out / "digits_mlp.train_x.npy")
    assert train_x.dtype == np.float32
    assert train_x.shape == (summary["n_train"], 64)
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


def test_tabular_files_and_accuracy(tabular_dir: Built) -> None:
    out, summary = tabular_dir
    for suffix in (".onnx", ".train_x.npy", ".test_x.npy", ".test_y.npy", ".json"):
        name = f"tabular{suffix}"
        assert (out / name).is_file(), name
    recorded = json.loads((out / "tabular.json").read_text())
    n_features = len(recorded["feature_names"])
    train_x = np.load(out / "tabular.train_x.npy")
    x = np.load(out / "tabular.test_x.npy")
    y = np.load(out / "tabular.test_y.npy")
    assert train_x.dtype == x.dtype == np.float32
    assert y.dtype == np.int64
    assert train_x.shape == (recorded["n_train"], n_features)
    assert x.shape == (recorded["n_test"], n_features)
    assert set(np.unique(y)) <= set(range(len(recorded["class_names"])))

    assert onnx.load(out / "tabular.onnx").ir_version <= 8  # loadable by older onnxruntime
    sess = session(out / "tabular.onnx")
    (inp,) = sess.get_inputs()
    assert (inp.name, inp.type, inp.shape[1]) == ("input", "tensor(float)", n_features)
    assert [(o.name, o.type) for o in sess.get_outputs()] == [("label", "tensor(int64)"),
                                                                 ("probabilities", "tensor(float)")]
    label, proba = sess.run(None, {"input": x})
    assert label.shape == (len(x),)
    assert proba.shape == (len(x), len(recorded["class_names"]))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    accuracy = float(np.mean(label == y))
    assert accuracy >= 0.9
    assert recorded["onnx_test_accuracy"] == pytest.approx(accuracy)
    assert summary["onnx_test_accuracy"] == pytest.approx(accuracy)


def cnn_preprocessor(sess: Any) -> Preprocessor:
    """The agent's preprocessing, built from the spec stored in the model, as the runtime does."""
    spec = json.loads(sess.get_modelmeta().custom_metadata_map["edge_runtime.preprocess"])
    return Preprocessor(PreprocessSpec.from_dict(spec), "image")


def test_cnn_metadata_and_shapes(cnn_dir: Built) -> None:
    out, summary = cnn_dir
    for suffix in (".onnx", ".sample_x.npy", ".test_x.npy", ".test_y.npy", ".calib_x.npy", ".json"):
        name = f"cnn{suffix}"
        assert (out / name).is_file(), name
    recorded = json.loads((out / "cnn.json").read_text())
    assert summary["trained"] is True and recorded["trained"] is True
    assert recorded["method"] == "random conv features + trained linear head"

    sess = session(out / "cnn.onnx")
    meta = sess.get_modelmeta().custom_metadata_map
    preprocess = json.loads(meta["edge_runtime.preprocess"])
    assert preprocess == {
        "resize": [64, 64],
        "source_color": "BGR",
        "color": "RGB",
        "layout": "NCHW",
        "scale": pytest.approx(1 / 255),
        "dtype": "float32",
    }
    (inp,) = sess.get_inputs()
    assert inp.name == "image"
    assert inp.shape == ["batch", 3, 64, 64]
    (outp,) = sess.get_outputs()
    assert (outp.name, outp.shape) == ("probabilities", ["batch", 10])

    frames = np.load(out / "cnn.sample_x.npy")
    assert frames.dtype == np.uint8
    assert frames.shape[1:] == (64, 64, 3) and len(frames) >= 32
    calib = np.load(out / "cnn.calib_x.npy")
    assert calib.dtype == np.float32
    assert calib.shape[1:] == (3, 64, 64) and 100 <= len(calib) <= 300
    assert calib.min() >= 0.0 and calib.max() <= 1.0
    (proba,) = sess.run(["probabilities"], {"image": calib[:8]})
    assert proba.shape == (8, 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-4)


def test_cnn_preprocess_spec_matches_the_build(cnn_dir: Built) -> None:
    """The stored spec, applied by the agent, gives exactly the inputs the head was trained on."""
    out, _ = cnn_dir
    frames = np.load(out / "cnn.sample_x.npy")
    agent = cnn_preprocessor(session(out / "cnn.onnx"))
    ours = load_script("build_cnn").preprocess(frames)
    by_hand = frames[..., ::-1].transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
    for i, frame in enumerate(frames):
        x = agent(frame)
        assert x.dtype == np.float32 and x.shape == (3, 64, 64)
        np.testing.assert_array_equal(x, ours[i])
        np.testing.assert_allclose(x, by_hand[i], rtol=1e-6)


def test_cnn_classifies_held_out_frames(cnn_dir: Built) -> None:
    out, summary = cnn_dir
    frames = np.load(out / "cnn.test_x.npy")
    y = np.load(out / "cnn.test_y.npy")
    assert frames.dtype == np.uint8 and frames.shape[1:] == (64, 64, 3)
    assert y.dtype == np.int64 and y.shape == (len(frames),)
    assert 100 <= len(frames) <= 600
    samples = np.load(out / "cnn.sample_x.npy")
    np.testing.assert_array_equal(samples, frames[: len(samples)])  # the samples are real test frames

    sess = session(out / "cnn.onnx")
    agent = cnn_preprocessor(sess)
    x = np.stack([agent(f) for f in frames])
    (proba,) = sess.run(None, {"image": x})
    accuracy = float(np.mean(proba.argmax(axis=1) == y))
    assert accuracy >= 0.8
    recorded = json.loads((out / "cnn.json").read_text())
    assert recorded["onnx_test_accuracy"] == pytest.approx(accuracy)
    assert summary["onnx_test_accuracy"] == pytest.approx(accuracy)
    assert recorded["n_test"] == len(frames)

    # The channel order matters: frames fed without the BGR -> RGB swap are mostly misclassified.
    swapped = np.ascontiguousarray(x[:, ::-1])
    (wrong,) = sess.run(None, {"image": swapped})
    assert float(np.mean(wrong.argmax(axis=1) == y)) < accuracy - 0.3


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


def test_build_all_builds_everything(built: Built) -> None:
    out, results = built
    assert set(results) == {"build_digits_mlp", "build_tabular", "build_cnn", "build_test_models",
                            "build_escalation_pair"}
    assert all(r["build_seconds"] > 0 for r in results.values())
    expected = {
        "digits_mlp.onnx",
        "tabular.onnx",
        "cnn.onnx",
        "multi_input.onnx",
        "fixed_shape.onnx",
        "no_batch.onnx",
    }
    assert expected <= {p.name for p in out.iterdir()}
    for name in expected:
        session(out / name)
    for summary in results.values():
        for name in summary.get("files", []):
            assert (out / name).is_file(), name
