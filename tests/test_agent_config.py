"""The agent's configuration file: validated with the key, file and line in errors; environment
variables over the file; flags over both; the example and the README in step with the schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_runtime import agent_config
from edge_runtime.errors import ConfigError
from tests.conftest import ROOT, cli


def test_the_example_file_is_valid_and_sets_every_key() -> None:
    values = agent_config.load(ROOT / "devices" / "agent.example.toml", env={})
    assert values["model"] == ["digits_mlp=/var/lib/edge-runtime/bundles/digits_mlp-3"]
    assert values["source"] == ["camera:0"] and values["batch"] == 1 and values["tag"] == ["site:lab", "hw:pi4"]
    assert values["broker"] == "mqtts://broker.example.com:8883" and values["no_sync"] is False
    text = (ROOT / "devices" / "agent.example.toml").read_text()
    for k in agent_config.SCHEMA:
        assert f"{k.name} =" in text, f"the example does not show {k.table}.{k.name}"


def test_the_readme_table_is_the_schemas() -> None:
    readme = (ROOT / "README.md").read_text()
    assert agent_config.reference_table() in readme


@pytest.mark.parametrize(("text", "message", "line"), [
    ("device_id = 'a'\nprofil = 'rpi4'\n", "unknown key 'profil'", 2),
    ("[buffer]\nmax_mb = 'big'\n", "key 'max_mb' in [buffer] must be", 2),
    ("[[model]]\nsource = 'stdin'\n", "has no 'path'", None),
    ("[broker]\nurl = 'mqtt://h'\nport = 1883\n", "unknown key 'port' in [broker]", 3),
    ("tags = [1, 2]\n", "array of strings", 1),
])
def test_errors_name_the_key_the_file_and_the_line(tmp_path: Path, text: str, message: str, line: int | None) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as ei:
        agent_config.load(f, env={})
    assert message in str(ei.value) and str(f) in str(ei.value)
    if line is not None:
        assert ei.value.line == line


def test_environment_beats_the_file(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text("device_id = 'from-file'\n[metrics]\nport = 9100\n[broker]\nurl = 'mqtt://file:1883'\n")
    v = agent_config.load(f, env={"EDGE_RUNTIME_DEVICE_ID": "from-env", "EDGE_RUNTIME_METRICS_PORT": "9200"})
    assert (v["device_id"], v["metrics_port"], v["broker"]) == ("from-env", 9200, "mqtt://file:1883")
    with pytest.raises(ConfigError, match="must be a number"):
        agent_config.load(f, env={"EDGE_RUNTIME_METRICS_PORT": "lots"})


def test_run_takes_its_models_from_the_file_and_flags_win(models_dir: Path, tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(f"[[model]]\nname = 'dig'\npath = '{models_dir / 'digits_mlp.onnx'}'\n"
                 f"source = 'npy:{models_dir / 'digits_mlp.test_x.npy'}'\n[drift]\nenabled = false\n"
                 "[metrics]\nstatus_interval_s = 0\n")
    r = json.loads(cli("run", "--config", str(f), "--max-inputs", "7", "--json").stdout)
    assert r["pipelines"][0]["name"] == "dig" and r["pipelines"][0]["predictions"] == 7
    r = json.loads(cli("run", "--config", str(f), "--max-inputs", "5", "--json", "--model",
                       str(models_dir / "tabular.onnx"), "--source", "synthetic").stdout)
    assert r["pipelines"][0]["name"] == "tabular" and r["pipelines"][0]["predictions"] == 5
    bad = tmp_path / "bad.toml"
    bad.write_text("[drift]\nenabeld = true\n")
    proc = cli("run", "--config", str(bad), check=False)
    assert proc.returncode == 1 and "bad.toml:2: unknown key 'enabeld' in [drift]" in proc.stderr
    proc = cli("run", "--config", str(tmp_path / "missing.toml"), check=False)
    assert proc.returncode == 1 and "missing.toml" in proc.stderr
