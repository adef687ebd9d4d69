"""The shared layer kit: the compute-dtype table and the small layers every family and
mechanism builds from (projections with logical axis names, LayerNorm, the GELU MLP).

Parameters are float32 and carry logical axis names (attention/sharding.py's rules); `dtype`
is the compute dtype. Imports nothing from trainer/ or models/.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attention.ops.fusion import materialize, on_rows

# config.train.compute_dtype -> the jnp dtype the layers compute in
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
    """config.train.compute_dtype ("float32" | "bfloat16") -> jnp dtype."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"compute dtype {name!r}: allowed {sorted(DTYPES)}") from None


class Dense(nnx.Linear):
    """nnx.Linear whose output (and its cotangent) XLA:CPU materialises rather than fusing into
    the next matmuls' operands, computed on the tokens as rows (attention/ops/fusion.py:
    together ~1.5x and ~1.3x on the CPU train step)."""

    def __call__(self, x):
        return on_rows(lambda r: materialize(super(Dense, self).__call__(r)), x)


def dense(din, dout, logical, *, dtype, rngs, std=0.02):
    """A bias-free Linear whose kernel carries logical axis names for the sharding rules."""
    return Dense(din, dout, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=nnx.with_partitioning(nnx.initializers.normal(std), logical),
                 rngs=rngs)


def linear(din: int, dout: int, logical, *, dtype, rngs, std: float | None = 0.02,
           bias: bool = True):
    """Linear with a bias whose kernel and bias carry logical axis names; std None: LeCun
    normal (fan-in), 0: zeros (a classifier head, as in big_vision)."""
    init = (nnx.initializers.lecun_normal() if std is None else
            nnx.initializers.zeros if std == 0 else nnx.initializers.normal(std))
    return Dense(din, dout, use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=nnx.with_partitioning(init, logical),
                 bias_init=nnx.with_partitioning(nnx.initializers.zeros, logical[-1:]),
                 rngs=rngs)


def param(rngs, init, shape, logical):
    """A float32 nnx.Param drawn from init, carrying logical axis names."""
    return nnx.Param(nnx.with_partitioning(init, logical)(rngs.params(), shape, jnp.float32))


def layer_norm(d: int, *, dtype, rngs, eps: float = 1e-6):
    return nnx.LayerNorm(d, epsilon=eps, dtype=dtype, param_dtype=jnp.float32,
                         scale_init=nnx.with_partitioning(nnx.initializers.ones, ("norm",)),
                         bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("norm",)),
                         rngs=rngs)


class Mlp(nnx.Module):
    """MLP(x) = GELU(x W1 + b1) W2 + b2 over the last axis (any leading shape). LeCun-normal
    weights: at these widths (64) the LM's N(0, 0.02) leaves the blocks near the identity and
    a tiny ViT on a long plateau (18% -> 25% held-out accuracy after 800 steps with LeCun)."""

    def __init__(self, d: int, hidden: int, *, dtype, rngs):
        self.fc1 = linear(d, hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs, std=None)
        self.fc2 = linear(hidden, d, ("mlp", "embed"), dtype=dtype, rngs=rngs, std=None)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class LoRALinear(nnx.Module):
    """A frozen projection W plus a low-rank update (Hu et al. 2022, eq. 3):
    y = x W + (alpha / r) (x A) B, A [D_in, r] random, B [r, D_out] zero. It keeps the wrapped
    layer's `kernel` (the same parameter, under the same name, so a pretrained checkpoint still
    loads into it). x [..., D_in] -> [..., D_out]."""

    def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs):
        din, dout = base.kernel.shape
        self.kernel = base.kernel
        self.bias = base.bias if base.use_bias else None
        self.dtype = base.dtype
        self.scale = alpha / rank
        self.lora_a = param(rngs, nnx.initializers.lecun_normal(), (din, rank), ("embed", None))
        self.lora_b = param(rngs, nnx.initializers.zeros, (rank, dout), (None, None))

    def merged_kernel(self):
        """W + (alpha / r) A B: the one matrix the layer computes with (an export holds it)."""
        return self.kernel[...] + self.scale * (self.lora_a[...] @ self.lora_b[...])

    def __call__(self, x):
        return on_rows(self._rows, x)

    def _rows(self, x):
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        y = x @ self.kernel[...].astype(dtype)
        y = y + self.scale * ((x @ self.lora_a[...].astype(dtype)) @ self.lora_b[...].astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return materialize(y)
