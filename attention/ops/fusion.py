"""`materialize(x)`: identity whose value and cotangent XLA:CPU must write out whole.

Why (measured, bench/peer.py and README "Performance"): XLA:CPU fuses the elementwise work
around a matmul (an activation's derivative, a residual add) into the fusions that feed the next
matmuls, and when two dots consume one such cotangent (dX = dH W^T and dW = X^T dH) it computes
the fusion twice, once writing a transposed copy. On the GPT-2 MLP (8 x 512 x 1024
activations) that turned a ~2 ms GELU backward into ~45 ms. An optimisation barrier on a matmul's
output and on its cotangent makes XLA compute each once, in the layout the dots read directly.
GPU and TPU fuse these well (into matmul prologues / epilogues): there it is the identity.
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
