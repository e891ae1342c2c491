"""lmcore: a reproducible factory for small language models."""

__version__ = "0.1.0"
