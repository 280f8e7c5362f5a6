"""Errors the CLI reports as one line and exit status 1."""

from quant import QuantError


class GgufMoeError(Exception):
    """Base class: the message is complete (what, where, expected vs found, what to do)."""


class ConfigError(GgufMoeError):
    """config.json (or another metadata file) is missing, unreadable or lacks a key."""


class UnsupportedArchitecture(GgufMoeError):
    """The model's architecture is not one we convert."""


class MissingTensor(GgufMoeError):
    """A tensor the architecture needs is absent, or an index names a tensor no shard has."""


class LayoutMismatch(GgufMoeError):
    """Shapes or dtypes disagree with the config or with each other (e.g. experts)."""


class CorruptFile(GgufMoeError):
    """A file is truncated, its header lies, or its data is invalid (NaN/Inf weights)."""


class TokenizerError(GgufMoeError):
    """The tokenizer cannot be converted (unknown pre-tokenizer, missing files)."""


__all__ = [
    "GgufMoeError",
    "ConfigError",
    "UnsupportedArchitecture",
    "MissingTensor",
    "LayoutMismatch",
    "CorruptFile",
    "TokenizerError",
    "QuantError",
]
