"""Looking inside an attention layer: what notebooks and analyses use, without internals.

    cfg = attention.layer_config("hip", d_model=64, num_heads=4, hip_mask_k=64)
    layer = attention.build("hip", cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    seen = attention.explain(layer, x, positions)   # {"weights": [B, H, T, T], "block_mask": ...}

`explain` returns numpy arrays: "weights", the attention weights each head applies (read off the
layer's own attention by attending with one-hot values, so it is what the layer computes,
sparse blocks, clusters and calibration included), plus what the mechanism decides on the way
(its `explain_extras`): "block_mask" [B|1, H|1, NQ, NK] (HiP, DHSA, FlexPrefill, with
"query_aware" [B, H] for FlexPrefill), "clusters" [B, R, C, T] (Routing: which tokens each
centroid holds, per routed head), "retrieved" [B, H, NQ, NQ] (Landmark: 1 for a retrieved
block, 0.5 for the query's own). Mechanisms of the softmax family (those sharing its q / k / v
/ o projections; ComplexFormer through its own rotations) are supported; a linear attention
(GLA, Hedgehog) is refused by name. The layer is inspected as a copy in eval mode: nothing of
it changes (no centroid update, nothing sown), and a mechanism that samples in training (SSA)
shows its deterministic evaluation path.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attention.ops.rope import apply_rope
from attention.registry import add_options

__all__ = ["layer_config", "queries_and_keys", "effective_weights", "attention_weights",
           "explain"]


def layer_config(name: str, *, d_model: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int = 0, num_layers: int = 1, rope_theta: float = 0.0,
                 causal: bool = True, **options):
    """The config.model one layer of mechanism `name` is built from: the width fields every
    mechanism reads, the mechanism's option defaults (its CONFIG_DEFAULTS), then `options`
    (an option the mechanism does not have is a ValueError naming the ones it has)."""
    from ml_collections import ConfigDict

    c = ConfigDict(dict(attention=name, d_model=d_model, num_heads=num_heads,
                        num_kv_heads=num_kv_heads or num_heads, head_dim=head_dim,
                        num_layers=num_layers, rope_theta=rope_theta, causal=causal))
    add_options(c)
    unknown = sorted(set(options) - set(c))
    if unknown:
        known = sorted(set(c) - {"attention", "d_model", "num_heads", "num_kv_heads",
                                 "head_dim", "num_layers", "rope_theta", "causal"})
        raise ValueError(f"layer_config({name!r}): no option {', '.join(unknown)}; {name} has "
                         f"{', '.join(known) or 'none'}")
    c.update(options)
    return c


def _check(layer, who: str) -> None:
    if not (hasattr(layer, "project") and hasattr(layer, "attend")):
        raise TypeError(f"{who}: {type(layer).__name__} is not a softmax-family layer (q / k / "
                        "v projections and a softmax over keys); the supported mechanisms are "
                        "softmax and those sharing its projections (HiP, DHSA, FlexPrefill, SSA, "
                        "Routing, Landmark, ACT, MoH, ComplexFormer)")


def queries_and_keys(layer, x, positions):
    """q [B, T, H, hd] and k [B, T, H_kv, hd] as the layer's attention sees them (projected,
    then RoPE, or the layer's own rotate_queries / rotate_keys where it has them:
    ComplexFormer)."""
    _check(layer, "attention.queries_and_keys")
    q, k, _ = layer.project(x, "train")
    if hasattr(layer, "rotate_queries"):
        return (layer.rotate_queries(q, positions).astype(q.dtype),
                layer.rotate_keys(k, positions).astype(q.dtype))
    rope = dict(theta=layer.rope_theta, scaling=layer.rope_scaling)
    return apply_rope(q, positions, **rope), apply_rope(k, positions, **rope)


def _inspected(layer):
    """A copy of the layer in eval mode: inspecting never changes the layer."""
    copy = nnx.clone(layer)
    copy.eval()
    return copy


def _quiet(fn):
    """fn(module, *args) under nnx.capture, so what a layer sows stays out of it."""
    return lambda m, *a: nnx.capture(fn, nnx.Intermediate)(m, *a)[0]


def effective_weights(attend, q, k):
    """The weights [B, H, T, T] an attention applies: `attend(q, k, v) -> [B, T, H, hd]` is
    linear in v, so attending with one-hot values (chunks of hd keys, stacked on the batch
    axis, chunk-major) reads A[b, h, i, j] off its outputs. Traceable (a jnp array)."""
    B, T, H, hd = q.shape
    chunks = -(-T // hd)
    onehot = jnp.eye(chunks * hd)[:T].reshape(T, chunks, hd).transpose(1, 0, 2)  # [C, T, hd]
    v = jnp.broadcast_to(onehot[:, None, :, None, :], (chunks, B, T, k.shape[2], hd))
    rep = lambda a: jnp.broadcast_to(a[None], (chunks, *a.shape)).reshape(-1, *a.shape[1:])  # noqa: E731
    y = attend(rep(q), rep(k), v.reshape(chunks * B, T, k.shape[2], hd))     # [C*B, T, H, hd]
    y = y.reshape(chunks, B, T, H, hd).transpose(1, 3, 2, 0, 4).reshape(B, H, T, chunks * hd)
    return y[..., :T].astype(jnp.float32)


def _weights(copy, q, k, mode: str):
    """effective_weights of an inspected copy's own attend at `mode` (numpy)."""
    attend = nnx.jit(_quiet(lambda m, q, k, v: m.attend(q, k, v, mode=mode)))
    return np.asarray(effective_weights(lambda q, k, v: attend(copy, q, k, v), q, k))


def attention_weights(layer, x, positions, *, mode: str = "train") -> np.ndarray:
    """[B, H, T, T]: the weights the layer's heads apply to x (its `attend` at `mode`: "train",
    or "prefill" for the sparse prefill methods)."""
    copy = _inspected(layer)
    return _weights(copy, *queries_and_keys(copy, x, positions), mode)


def explain(layer, x, positions, *, mode: str = "prefill") -> dict[str, np.ndarray]:
    """What the layer computes for x [B, T, D] at `mode`, as numpy arrays: "weights" [B, H, T, T]
    and the mechanism's own structures (module docstring)."""
    _check(layer, "attention.explain")
    copy = _inspected(layer)  # one copy, one projection, for the extras and the weights
    q, k = queries_and_keys(copy, x, positions)
    out = {}
    if hasattr(copy, "explain_extras"):
        found = nnx.jit(_quiet(lambda m, x, p, q, k: m.explain_extras(
            x, positions=p, q=q, k=k, mode=mode)))(copy, x, positions, q, k)
        out = {name: np.asarray(jax.device_get(v)) for name, v in found.items()}
    if "weights" not in out:
        out["weights"] = _weights(copy, q, k, mode)
    return out
