"""The attention library: NNX layers (registered by name) and functional ops (attention/ops)."""
from attention.registry import build, get, names, register

__all__ = ["build", "get", "names", "register"]
