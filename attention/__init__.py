"""The attention library: NNX layers (registered by name) and functional ops (attention/ops)."""
import attention._xla_env  # noqa: F401  (an XLA:CPU workaround flag, set before jax starts)
from attention.registry import build, get, names, register

__all__ = ["build", "get", "names", "register"]
