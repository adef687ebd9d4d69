"""The attention registry: `model.attention` (a config name) -> an NNX module class.

Families build attention only through `build(name, ...)`, so a new mechanism is a new file in
attention/ that registers itself; no family changes.

Self-attention modules share one call shape:
    module(x [B, T, D], *, positions [B, T] int32, cache=None, mode="train"|"prefill"|"decode")
        -> (y [B, T, D], cache)
and a constructor `Module(model_config, *, dtype, rngs)` reading the fields it needs from the
family's `config.model` (d_model, num_heads, num_kv_heads, head_dim, ...), plus
`init_cache(batch, max_len, dtype) -> cache` for generation.
"""
from __future__ import annotations

import importlib
import importlib.util

_REGISTRY: dict[str, type] = {}
# mechanisms living in their own modules are imported on first use, keeping start-up light
_MODULES = {name: f"attention.{name}" for name in (
    "softmax", "gla", "hedgehog",
    "routing", "landmark", "hip", "flexprefill", "dhsa", "ssa",  # sparse (block_sparse_attention)
    "moh", "complexformer",  # head-level (Mixture-of-Head) and positional (complex phase)
    "act",  # inference-time attention calibration (a SoftmaxAttention subclass)
)}


def register(name: str):
    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"attention {name!r} registered twice")
        _REGISTRY[name] = cls
        return cls
    return deco


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def names() -> list[str]:
    return sorted(set(_REGISTRY) | {n for n, m in _MODULES.items() if _available(m)})


def get(name: str) -> type:
    if name not in _REGISTRY and name in _MODULES and _available(_MODULES[name]):
        importlib.import_module(_MODULES[name])
    if name not in _REGISTRY:
        raise KeyError(f"unknown attention {name!r}; registered: {', '.join(names())}")
    return _REGISTRY[name]


def build(name: str, model_config, *, dtype, rngs, layer: int | None = None):
    """The mechanism `name` built from `model_config`. `layer`: the block's depth (0-based),
    for mechanisms that behave per layer (ACT calibrates chosen (layer, head) pairs): they
    define `set_layer(layer)`; the others ignore it."""
    module = get(name)(model_config, dtype=dtype, rngs=rngs)
    if layer is not None and hasattr(module, "set_layer"):
        module.set_layer(layer)
    return module
