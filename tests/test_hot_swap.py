"""Hot swap and shadow mode on real onnxruntime sessions: a model changes under a continuous input
stream without dropping or repeating an input; a candidate runs beside the active model and is only
compared."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.adapters.onnx_engine import OnnxEngine
from edge_runtime.errors import ModelLoadError
from edge_runtime.pipeline import Pipeline
from edge_runtime.runtime import Agent
from edge_runtime.sources import EndOfSource

pytestmark = pytest.mark.integration


class Stream:
    """``n`` inputs with ids, as fast as the pipeline takes them (a live source that never waits)."""

    name = "stream"

    def __init__(self, rows: np.ndarray, n: int) -> None:
        self.rows, self.n, self.i = rows, n, 0

    def read(self, timeout: float | None = None):
        if self.i >= self.n:
            raise EndOfSource
        rec = {"id": f"in-{self.i}", "input": self.rows[self.i % len(self.rows)]}
        self.i += 1
        return rec

    def close(self) -> None:
        pass


def random_classifier(path: Path, seed: int) -> Path:
    """A model with the digits inputs whose answers are unrelated to them (a degraded candidate)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).normal(size=(64, 10)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["z"]), helper.make_node("Softmax", ["z"], ["probabilities"])],
        "random", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def rows(models_dir: Path) -> np.ndarray:
    return np.load(models_dir / "digits_mlp.test_x.npy")


@pytest.mark.parametrize("batch", [1, 8])
def test_swaps_under_a_continuous_stream_drop_and_repeat_nothing(models_dir: Path, profile, rows: np.ndarray,
                                                                 tmp_path: Path, batch: int) -> None:
    n = 6000
    seen: list[str] = []
    versions: list[str] = []

    def sink(records, labels, scores, outputs) -> None:
        seen.extend(r["id"] for r in records)
        versions.extend([pipe.version] * len(records))

    engines = [OnnxEngine(models_dir / "digits_mlp.onnx", profile),
               OnnxEngine(random_classifier(tmp_path / "r.onnx", 1), profile)]
    pipe = Pipeline("d", engines[0], Stream(rows, n), batch=batch, max_wait_s=0.001, sink=sink, version="1")
    agent = Agent([pipe], status_interval_s=0)
    done: dict = {}
    t = threading.Thread(target=lambda: done.setdefault("report", agent.run()))
    t.start()
    swapped = []
    for k in range(6):
        while len(seen) < (k + 1) * n // 8 and t.is_alive():
            time.sleep(0.002)
        swapped.append(pipe.swap(engines[(k + 1) % 2], str(k + 2), timeout_s=10))
    t.join(60)
    assert all(swapped)
    r = done["report"]["pipelines"][0]
    assert len(seen) == n and len(set(seen)) == n and r["predictions"] == n and r["errors"]["total"] == 0
    assert r["swaps"] == 6 and pipe.version == "7"
    # Each version answered one contiguous run of inputs, in order.
    runs = [versions[0]] + [b for a, b in itertools.pairwise(versions) if a != b]
    assert runs == ["1", "2", "3", "4", "5", "6", "7"]
    assert seen == sorted(seen, key=lambda s: int(s[3:]))


def test_a_model_with_other_inputs_is_refused_and_the_old_one_keeps_serving(models_dir: Path, profile,
                                                                             rows: np.ndarray) -> None:
    pipe = Pipeline("d", OnnxEngine(models_dir / "digits_mlp.onnx", profile), Stream(rows, 10), version="1")
    with pytest.raises(ModelLoadError, match="same inputs"):
        pipe.swap(OnnxEngine(models_dir / "tabular.onnx", profile), "2")
    while pipe.step():
        pass
    assert pipe.metrics.predictions == 10 and pipe.version == "1" and pipe.swaps == 0


def test_shadow_candidate_is_compared_never_acted_on(models_dir: Path, profile, rows: np.ndarray,
                                                     tmp_path: Path) -> None:
    answers: list[int] = []
    pipe = Pipeline("d", OnnxEngine(models_dir / "digits_mlp.onnx", profile), Stream(rows, 900), batch=4,
                    max_wait_s=0.0, sink=lambda recs, labels, scores, outs: answers.extend(labels.tolist()),
                    version="1")
    same = pipe.set_shadow(OnnxEngine(models_dir / "digits_mlp.onnx", profile), "1b")
    for _ in range(50):
        pipe.step()
    assert same.n > 0 and same.agreement_rate == 1.0 and abs(same.delta_mean) < 1e-6 and same.errors == 0
    bad = pipe.set_shadow(OnnxEngine(random_classifier(tmp_path / "r.onnx", 2), profile), "2", every=2)
    while pipe.step():
        pass
    r = pipe.report()
    assert r["shadow"]["version"] == "2" and r["shadow"]["n"] == bad.n > 0
    assert bad.agreement_rate < 0.5  # a degraded candidate shows
    assert bad.latency_quantile_ns(0.5) > 0
    # Every answer came from the active model: the same as running it alone.
    import onnxruntime as ort

    sess = ort.InferenceSession(str(models_dir / "digits_mlp.onnx"), providers=["CPUExecutionProvider"])
    expected = sess.run(["probabilities"], {"input": np.resize(rows, (900, 64)).astype(np.float32)})[0].argmax(1)
    assert answers == expected.tolist()
    assert pipe.set_shadow(None) is None and "shadow" not in pipe.report()
