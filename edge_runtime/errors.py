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
                 line: int | None = None, expected: str | None = None, got: str | None = None) -> None:
        if expected is not None:
            message += f": expected {expected}, got {got}"
        where = ""
        if path:
            where = f"{path}:{line}: " if line else f"{path}: "
        super().__init__(f"{where}{message}")
        self.path = path
        self.key = key
        self.line = line
        self.expected = expected
        self.got = got


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


class KeyFileError(EdgeRuntimeError):
    """A key file is missing, unreadable, too open, or not an edge-runtime ed25519 key."""


class BundleError(EdgeRuntimeError):
    """A model bundle failed a check. ``code`` says which (one of :data:`BUNDLE_ERROR_CODES`), so
    scripts and the cloud can act on it; the message says what was expected and what was found."""

    def __init__(self, code: str, message: str, *, bundle: str | None = None) -> None:
        self.code = code
        self.bundle = bundle
        super().__init__(f"bundle {bundle}: {message} [{code}]" if bundle else f"{message} [{code}]")


BUNDLE_ERROR_CODES = (
    "not_a_bundle",        # no manifest.json / model.onnx where a bundle was expected
    "bad_manifest",        # manifest.json is not valid JSON or misses required fields
    "missing_signature",   # manifest.sig is absent
    "bad_signature",       # the signature does not verify with the key that it names
    "unknown_key",         # signed by a key that is not configured on this device
    "missing_file",        # a file listed in the manifest is absent
    "extra_file",          # a file is present that the manifest does not list
    "size_mismatch",       # a file's size differs from the manifest
    "hash_mismatch",       # a file's sha256 differs from the manifest
    "onnx_checker",        # onnx.checker rejected the model
    "model_load",          # onnxruntime could not load the model
    "smoke_mismatch",      # the smoke run's outputs differ from the expected ones
    "expired",             # the bundle's expiry time has passed
    "wrong_profile",       # the bundle is not meant for this device profile
    "unsafe_archive",      # an archive member is a link, a device, an absolute or parent path, too big
    "truncated_archive",   # the archive ends early or is not a tar file
)


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
