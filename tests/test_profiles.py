"""Device profiles: the shipped ones parse; mistakes are errors that name the key, the file, the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_runtime.adapters.onnx_engine import choose_providers
from edge_runtime.errors import ConfigError, ProviderError
from edge_runtime.profiles import available_profiles, detect_profile, load_profile, parse_profile

SHIPPED = ("x86-generic", "rpi4", "rpi5", "jetson-orin-nano", "generic")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profiles_parse(name: str) -> None:
    p = load_profile(name)
    assert p.name == name
    assert p.providers[-1] == "CPUExecutionProvider"
    assert p.allow_spinning is False  # spinning idle threads cost ~half a core


def test_every_profile_in_devices_is_listed_and_the_example_config_is_not() -> None:
    root = Path(__file__).resolve().parent.parent / "devices"
    profiles = {p.stem for p in root.glob("*.toml") if not p.name.endswith(".example.toml")}
    assert profiles <= set(available_profiles()) and "agent.example" not in available_profiles()


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "board.toml"
    p.write_text(text)
    return p


def test_unknown_key_names_key_file_and_line(tmp_path: Path) -> None:
    p = write(tmp_path, 'name = "b"\n\n[session]\nproviders = ["CPUExecutionProvider"]\nintra_threads = 2\n')
    with pytest.raises(ConfigError) as ei:
        parse_profile(p)
    msg = str(ei.value)
    assert "intra_threads" in msg and str(p) in msg and ":5:" in msg
    assert ei.value.key == "intra_threads" and ei.value.line == 5


def test_unknown_top_level_table_and_wrong_type(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'sesion'"):
        parse_profile(write(tmp_path, 'name = "b"\n[sesion]\nx = 1\n'))
    with pytest.raises(ConfigError, match=r"'allow_spinning' in \[session\] must be a boolean") as ei:
        parse_profile(write(tmp_path, 'name = "b"\n[session]\nallow_spinning = "no"\n'))
    assert ei.value.line == 3
    with pytest.raises(ConfigError, match="must be one of"):
        parse_profile(write(tmp_path, 'name = "b"\n[session]\ngraph_optimization = "max"\n'))
    with pytest.raises(ConfigError, match="missing required key 'name'"):
        parse_profile(write(tmp_path, "[session]\n"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_profile(write(tmp_path, "name = \n"))


def test_unknown_profile_name_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown device profile 'pi9'.*rpi4"):
        load_profile("pi9")


@pytest.mark.parametrize(("board", "machine", "expected"), [
    ("Raspberry Pi 4 Model B Rev 1.4", "aarch64", "rpi4"),
    ("Raspberry Pi 5 Model B Rev 1.0", "aarch64", "rpi5"),
    ("NVIDIA Jetson Orin Nano Developer Kit", "aarch64", "jetson-orin-nano"),
    ("", "x86_64", "x86-generic"),
    ("", "riscv64", "generic"),
    ("Some Unknown Board", "aarch64", "generic"),
])
def test_detection(board: str, machine: str, expected: str) -> None:
    assert detect_profile(board_model=board, machine=machine).name == expected


def test_missing_providers_fall_back_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    jetson = load_profile("jetson-orin-nano")
    relaxed = type(jetson)(**{**jetson.__dict__, "strict_providers": False})
    wanted, missing = choose_providers(relaxed, ["CPUExecutionProvider"])
    assert wanted == ["CPUExecutionProvider"]
    assert missing == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert "TensorrtExecutionProvider" in caplog.text and "falling back" in caplog.text


def test_strict_profile_refuses_to_start_without_its_first_provider() -> None:
    with pytest.raises(ProviderError, match="strict_providers = true") as ei:
        choose_providers(load_profile("jetson-orin-nano"), ["CPUExecutionProvider", "AzureExecutionProvider"])
    assert "TensorrtExecutionProvider" in str(ei.value)
    all_three = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    wanted, _ = choose_providers(load_profile("jetson-orin-nano"), all_three)
    assert wanted[0] == "TensorrtExecutionProvider"
