"""The architecture tables, kept importable under their first name; each architecture now
lives in its own module of :mod:`gguf_moe.archs`."""

from gguf_moe.archs import *  # noqa: F403
from gguf_moe.archs import __all__  # noqa: F401
