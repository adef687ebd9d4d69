"""`materialize(x)`: identity whose value and cotangent XLA:CPU must write out whole;
`on_rows(fn, x)`: a projection applied to x flattened to one row per token on CPU.

Why (measured, bench/peer.py and README "Performance"): XLA:CPU fuses the elementwise work
around a matmul (an activation's derivative, a residual add) into the fusions that feed the next
matmuls, and when two dots consume one such cotangent (dX = dH W^T and dW = X^T dH) it computes
the fusion twice, once writing a transposed copy. On the GPT-2 MLP (8 x 512 x 1024
activations) that turned a ~2 ms GELU backward into ~45 ms. An optimisation barrier on a matmul's
output and on its cotangent makes XLA compute each once, in the layout the dots read directly.
GPU and TPU fuse these well (into matmul prologues / epilogues): there it is the identity.

`on_rows` (measured, bench/step_profile.py): a projection of x [B, T, D] is a dot_general with
two free dimensions on the left; its weight gradient contracts over both (B and T), and XLA:CPU's
dot canonicalisation then writes a transposed copy of the cotangent ([D_out, B T]) before the
weight-gradient dot, for every projection. On the 2-D view [B T, D] the same dots read their
operands as they are: the tanh-GELU MLP's forward + backward at 8 x 512 x 256 -> 1024 went from
413 to 280-318 ms. GPU / TPU: the call as is (a reshape there could disturb sequence sharding).
"""
from __future__ import annotations

import jax

from pallas_kernels import platform


@jax.custom_vjp
def _barrier(x):
    return jax.lax.optimization_barrier(x)


_barrier.defvjp(lambda x: (jax.lax.optimization_barrier(x), None),
                lambda _, g: (jax.lax.optimization_barrier(g),))


def materialize(x):
    """x unchanged; on CPU, x and its cotangent are computed once and stored (not fused)."""
    return _barrier(x) if platform.backend() == "cpu" else x


def on_rows(fn, x):
    """fn(x) for a row-wise fn (a projection over the last axis): x [..., D] -> [..., D_out];
    on CPU computed on x as [N, D] (N = the product of the leading axes) and reshaped back."""
    if x.ndim <= 2 or platform.backend() != "cpu":
        return fn(x)
    y = fn(x.reshape(-1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], y.shape[-1])
