"""The engine and the pipeline on real onnxruntime sessions over models built by models/."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.adapters.onnx_engine import OnnxEngine
from edge_runtime.core.preprocess import PreprocessSpec
from edge_runtime.errors import ConfigError, InputValidationError, ModelLoadError
from edge_runtime.pipeline import Pipeline, resolve_model
from edge_runtime.sources import ArraySource, CsvSource, EndOfSource, StdinSource, SyntheticSource

pytestmark = pytest.mark.integration


class ListSource:
    """Records from a list; an exception instance in the list is raised by that read."""

    name = "list"

    def __init__(self, records: list) -> None:
        self.records = list(records)

    def read(self, timeout: float | None = None):
        if not self.records:
            raise EndOfSource
        r = self.records.pop(0)
        if isinstance(r, Exception):
            raise r
        return r

    def close(self) -> None:
        pass


def drain(p: Pipeline) -> None:
    while p.step():
        pass


@pytest.fixture(scope="module")
def digits(models_dir: Path, profile) -> OnnxEngine:
    return OnnxEngine(models_dir / "digits_mlp.onnx", profile)


@pytest.fixture(scope="module")
def test_x(models_dir: Path) -> np.ndarray:
    return np.load(models_dir / "digits_mlp.test_x.npy")


def test_engine_reads_spec_and_reports_providers(digits: OnnxEngine) -> None:
    assert digits.spec.input_names == ("input",)
    assert digits.spec.inputs[0].shape == (None, 64)
    assert digits.spec.batchable
    assert digits.providers == ["CPUExecutionProvider"]
    d = digits.describe()
    assert d["providers"] == ["CPUExecutionProvider"] and d["spec"]["inputs"][0]["dtype"] == "float32"


def test_io_binding_runner_matches_session_run(digits: OnnxEngine, test_x: np.ndarray) -> None:
    for batch in (1, 5):
        run = digits.runner(batch)
        feeds = {"input": np.ascontiguousarray(test_x[:batch])}
        want = digits.session.run(None, feeds)
        got = run(feeds)
        assert [g.shape for g in got] == [w.shape for w in want]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-6)


def test_bad_model_file_is_a_clear_error(tmp_path: Path, profile) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(ModelLoadError, match=r"cannot load model .*broken\.onnx"):
        OnnxEngine(bad, profile)
    with pytest.raises(ModelLoadError, match="model not found"):
        resolve_model(tmp_path / "missing.onnx")


def test_pipeline_predicts_like_the_model(digits: OnnxEngine, models_dir: Path, test_x: np.ndarray) -> None:
    p = Pipeline("digits", digits, ArraySource(str(models_dir / "digits_mlp.test_x.npy")))
    drain(p)
    labels = np.load(models_dir / "digits_mlp.test_y.npy")
    probs = digits.session.run(None, {"input": test_x})[1]
    expected = np.bincount(probs.argmax(axis=1), minlength=10)
    got = np.array([p.metrics.labels.get(i, 0) for i in range(10)])
    assert (got == expected).all()
    assert p.metrics.predictions == len(labels) == p.metrics.inputs
    assert p.metrics.error_total == 0
    rep = p.report()
    for stage in ("read", "preprocess", "infer", "postprocess", "latency"):
        assert rep["latency_us"][stage]["count"] == len(labels)
        assert rep["latency_us"][stage]["p50"] <= rep["latency_us"][stage]["p99"]


def test_every_bad_input_is_counted_and_the_next_good_one_served(digits: OnnxEngine,
                                                                 test_x: np.ndarray) -> None:
    good = test_x[0]
    bad = [
        ("rank", test_x[:2]),
        ("shape", good[:10]),
        ("dtype", np.array(["x"] * 64)),
        ("nonfinite", np.where(np.arange(64) == 3, np.nan, good).astype(np.float32)),
        ("nonfinite", np.where(np.arange(64) == 3, np.inf, good).astype(np.float32)),
        ("missing_input", {"pixels": good}),
        ("unknown_input", {"input": good, "extra": good}),
        ("decode", InputValidationError("decode", "stdin", "JSON", "garbage")),
    ]
    records: list = []
    for _, rec in bad:
        records += [rec, good]
    p = Pipeline("digits", digits, ListSource(records))
    drain(p)
    want: dict[str, int] = {}
    for reason, _ in bad:
        want[reason] = want.get(reason, 0) + 1
    assert p.metrics.errors == want
    assert p.metrics.predictions == len(bad)  # each good input after a bad one was served
    assert p.metrics.inputs == 2 * len(bad)


def test_micro_batches_skip_only_the_bad_sample(digits: OnnxEngine, test_x: np.ndarray) -> None:
    records = [test_x[0], test_x[1], np.full(64, np.nan, np.float32), test_x[2], test_x[3], test_x[4]]
    p = Pipeline("digits", digits, ListSource(records), batch=4)
    drain(p)
    assert p.metrics.predictions == 5
    assert p.metrics.errors == {"nonfinite": 1}
    assert p.metrics.batches == 2  # 4 good samples, then the last one alone at the end of the source
    probs = digits.session.run(None, {"input": test_x[:5]})[1]
    assert sum(p.metrics.labels.values()) == 5
    for lab, n in zip(*np.unique(probs.argmax(axis=1), return_counts=True), strict=True):
        assert p.metrics.labels[int(lab)] == n


def test_batch_larger_than_the_model_allows_is_refused(models_dir: Path, profile) -> None:
    eng = OnnxEngine(models_dir / "fixed_shape.onnx", profile)
    with pytest.raises(ConfigError, match="at most 1 sample"):
        Pipeline("fixed", eng, ListSource([]), batch=4)


def test_model_without_batch_axis_and_scalar_output(models_dir: Path, profile) -> None:
    eng = OnnxEngine(models_dir / "no_batch.onnx", profile)
    assert not eng.spec.batchable
    x = np.arange(8, dtype=np.float32)
    p = Pipeline("nb", eng, ListSource([x, x[:4], x]))
    drain(p)
    assert p.metrics.predictions == 2 and p.metrics.errors == {"shape": 1}


def test_multi_input_model_from_synthetic_and_from_named_records(models_dir: Path, profile) -> None:
    eng = OnnxEngine(models_dir / "multi_input.onnx", profile)
    assert not eng.spec.batchable  # h0 is [1, batch, 16]: the batch is not on axis 0 everywhere
    src = SyntheticSource(eng.spec, overrides={"tokens": (2, 5), "mask": (2, 5), "h0": (1, 2, 16)})
    p = Pipeline("multi", eng, src)
    for _ in range(10):
        p.step()
    assert p.metrics.predictions == 10 and p.metrics.error_total == 0
    rec = {"tokens": np.array([[1, 2, 3]]), "mask": np.array([[True, True, False]]),
           "temperature": np.float32(1.0), "h0": np.zeros((1, 1, 16), np.float32)}
    p2 = Pipeline("multi", eng, ListSource([rec, np.zeros(3), {**rec, "tokens": np.array([[0.5, 1, 2]])}]))
    drain(p2)
    assert p2.metrics.predictions == 1
    assert p2.metrics.errors == {"missing_input": 1, "dtype": 1}


def test_cnn_preprocessing_from_model_metadata(models_dir: Path, profile) -> None:
    eng = OnnxEngine(models_dir / "cnn.onnx", profile)
    ref = resolve_model(models_dir / "cnn.onnx", eng.metadata)
    assert ref.preprocess is not None and ref.preprocess.layout == "NCHW"
    frames = np.load(models_dir / "cnn.sample_x.npy")  # uint8 HWC camera frames
    big = np.repeat(np.repeat(frames[0], 2, axis=0), 2, axis=1)  # 128x128: must be resized
    p = Pipeline("cnn", eng, ListSource([*frames, big, frames[0][:, :, :2]]), preprocess=ref.preprocess)
    drain(p)
    assert p.metrics.predictions == len(frames) + 1
    assert p.metrics.errors == {"preprocess": 1}
    # The agent's preprocessing is what the model expects: same answer as by hand.
    x = frames[0][:, :, ::-1].transpose(2, 0, 1)[None].astype(np.float32) / 255.0
    p1 = Pipeline("cnn", eng, ListSource([frames[0]]), preprocess=ref.preprocess)
    drain(p1)
    assert p1.metrics.labels == {int(eng.session.run(None, {"image": x})[0].argmax()): 1}


def test_bundle_directory_and_sidecar_preprocess(tmp_path: Path, models_dir: Path) -> None:
    b = tmp_path / "bundle"
    b.mkdir()
    (b / "model.onnx").write_bytes((models_dir / "digits_mlp.onnx").read_bytes())
    (b / "manifest.json").write_text(json.dumps({"name": "digits", "version": "3",
                                                 "preprocess": {"scale": 0.5}}))
    ref = resolve_model(b)
    assert (ref.name, ref.version, ref.preprocess) == ("digits", "3", PreprocessSpec(scale=0.5))
    side = tmp_path / "m.onnx"
    side.write_bytes(b"x")
    (tmp_path / "m.preprocess.json").write_text('{"scale": 2, "colour": "RGB"}')
    with pytest.raises(ConfigError, match="unknown preprocess key 'colour'"):
        resolve_model(side)


def test_stdin_source_decodes_json_lines_and_reports_bad_ones() -> None:
    r, w = os.pipe()
    os.write(w, b'[1, 2]\n{"a": [3]}\nnot json\n\n"text"\n[[1], [2, 3]]\n[5]')
    os.close(w)
    src = StdinSource(fd=r)
    assert src.read(1.0).tolist() == [1, 2]
    assert src.read(1.0)["a"].tolist() == [3]
    for what in ("invalid JSON on line 3", "str on line 5", "ragged"):
        with pytest.raises(InputValidationError, match=what):
            src.read(1.0)
    assert src.read(1.0).tolist() == [5]  # the last line has no newline
    with pytest.raises(EndOfSource):
        src.read(1.0)
    os.close(r)


def test_stdin_source_times_out_when_idle() -> None:
    r, w = os.pipe()
    try:
        assert StdinSource(fd=r).read(0.05) is None
    finally:
        os.close(r)
        os.close(w)


def test_csv_source_skips_header_and_reports_bad_cells(tmp_path: Path) -> None:
    f = tmp_path / "rows.csv"
    f.write_text("a,b,c\n1,2,3\n4,x,6\n7,8,9\n")
    src = CsvSource(str(f))
    assert src.read().tolist() == [1, 2, 3]
    with pytest.raises(InputValidationError, match="'x' on line 3"):
        src.read()
    assert src.read().tolist() == [7, 8, 9]
    with pytest.raises(EndOfSource):
        src.read()


@pytest.mark.parametrize("batch", [2, 3, 8])
def test_micro_batches_give_the_same_answers_and_errors_as_single_runs(digits: OnnxEngine, test_x: np.ndarray,
                                                                       batch: int) -> None:
    rng = np.random.default_rng(batch)
    bad = [np.full(64, np.nan, np.float32), test_x[0][:5], {"input": test_x[0], "other": test_x[0]},
           np.array(["a"] * 64), {"pixels": test_x[0]}, test_x[:2]]
    records: list = []
    for i in range(40):
        records.append(test_x[i])
        if rng.random() < 0.3:
            records.append(bad[int(rng.integers(len(bad)))])
    single = Pipeline("one", digits, ListSource(records))
    drain(single)
    many = Pipeline("many", digits, ListSource(records), batch=batch)
    drain(many)
    assert many.metrics.predictions == single.metrics.predictions == 40
    assert many.metrics.errors == single.metrics.errors and single.metrics.error_total > 0
    assert many.metrics.labels == single.metrics.labels
    assert many.metrics.batches < single.metrics.batches


def test_prediction_sink_gets_each_record_with_its_label(digits: OnnxEngine, test_x: np.ndarray) -> None:
    seen: list[tuple[int, int]] = []

    def sink(records: list, labels: np.ndarray, scores: np.ndarray, outputs: list) -> None:
        assert len(records) == len(labels) == len(scores)
        seen.extend((int(r[0]), int(lab)) for r, lab in zip(records, labels, strict=True))

    tagged = [np.concatenate([[float(i)], test_x[i][1:]]).astype(np.float32) for i in range(10)]
    p = Pipeline("s", digits, ListSource([tagged[0], np.full(64, np.nan), *tagged[1:]]), batch=4, sink=sink)
    drain(p)
    assert [i for i, _ in seen] == list(range(10))
    want = digits.session.run(None, {"input": np.stack(tagged)})[1].argmax(axis=1)
    assert [lab for _, lab in seen] == want.tolist()
