"""The agent's exception tree.

Every error the agent raises on purpose derives from :class:`EdgeRuntimeError`, carries structured
fields, and reads well as one journal line: what was expected, what arrived.
"""

from __future__ import annotations

from typing import Any


class EdgeRuntimeError(Exception):
    """Base class of every error raised on purpose by edge-runtime."""


class ConfigError(EdgeRuntimeError):
    """A configuration or device-profile file is wrong; names the file, the key and the line."""

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None,
                 line: int | None = None) -> None:
        where = ""
        if path:
            where = f"{path}:{line}: " if line else f"{path}: "
        super().__init__(f"{where}{message}")
        self.path = path
        self.key = key
        self.line = line


class ModelLoadError(EdgeRuntimeError):
    """A model file could not be loaded into a session."""


class ProviderError(EdgeRuntimeError):
    """A required execution provider is not available (``strict_providers = true``)."""


class SourceError(EdgeRuntimeError):
    """An input source could not be opened or read."""


class MissingExtraError(EdgeRuntimeError):
    """An optional dependency group is needed for this feature but is not installed."""

    def __init__(self, feature: str, extra: str, module: str) -> None:
        super().__init__(
            f"{feature} needs the '{extra}' extra ({module} is not installed): "
            f"pip install 'edge-runtime[{extra}]'"
        )
        self.feature = feature
        self.extra = extra


class InputValidationError(EdgeRuntimeError):
    """One input does not match the model's input spec; the loop counts it by ``reason`` and skips it.

    ``reason`` is one of :data:`INPUT_ERROR_REASONS`.
    """

    def __init__(self, reason: str, input_name: str, expected: Any, got: Any, detail: str = "") -> None:
        self.reason = reason
        self.input_name = input_name
        self.expected = expected
        self.got = got
        msg = f"input '{input_name}': {reason}: expected {expected}, got {got}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


INPUT_ERROR_REASONS = (
    "missing_input",   # a named input the model needs was not supplied
    "unknown_input",   # an input name the model does not have
    "rank",            # wrong number of dimensions
    "shape",           # right rank, a fixed dimension differs
    "dtype",           # element type cannot be converted without changing its kind (e.g. float -> int)
    "nonfinite",       # NaN or +/-Inf in a floating-point input
    "decode",          # a source record could not be parsed (bad JSON line, bad CSV cell)
    "preprocess",      # the preprocessing spec could not be applied (e.g. wrong channel count)
)
