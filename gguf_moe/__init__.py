"""gguf-moe: merged Mixture-of-Experts models -> llama.cpp GGUF, in one pass."""

__version__ = "0.1.0"
