"""The attention library: NNX layers (registered by name) and functional ops (attention/ops)."""
import attention._xla_env  # noqa: F401  (an XLA:CPU workaround flag, set before jax starts)
from attention.inspect import (attention_weights, effective_weights, explain, layer_config,
                               queries_and_keys)
from attention.registry import build, get, names, register

__all__ = ["build", "get", "names", "register", "layer_config", "explain", "attention_weights",
           "effective_weights", "queries_and_keys"]
