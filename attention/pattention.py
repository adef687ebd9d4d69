"""Pattention: token-parameter attention (TokenFormer, Wang et al., ICLR 2025, sec. 3.2).

A linear projection X W becomes attention of the input tokens (queries) over n learnable
parameter tokens: keys K_P [n, d_in] and values V_P [n, d_out]. Growing the layer appends
parameter tokens; with zero-initialised new keys (sec. 3.5, "similar to LoRA") and a zoom fixed
at the old size, the `l2_norm_gelu` and `gelu_l2_norm` normalisations leave the layer's
function unchanged exactly, because a zero key row adds a zero column to A = X K_P^T:
  l2_norm_gelu   GeLU(A / ||A||_2,row * zoom): the row norm is unchanged, GeLU(0) = 0;
  gelu_l2_norm   GeLU(A) / ||GeLU(A)||_2,row * zoom: GeLU(0) = 0 adds nothing to the norm;
so the new tokens' weights Theta_new are 0 and their values (freshly initialised, not zero:
zero keys and values together would be a saddle that never trains) do not reach the output.
  softmax        exp(A) / ||exp(A)||_1,row * zoom = zoom * softmax(A) (with zoom = n:
                 n softmax(X K_P^T) V_P) is NOT preserved: each zero key has exp(0) = 1 in the
                 denominator and weight zoom / (S + m) on its value, so the grown output is
                 (S O_old / zoom + sum_new V_new) zoom / (S + m) per row (S = sum_j exp(A_j) over
                 the old tokens, m = new tokens): the old output scaled by S / (S + m) when the
                 new values are zero.

The zoom must be a number fixed in the config (default: sqrt(n) or, for softmax, n at the
initial size): the reference's sqrt(n_current) changes the function whenever n grows.
Parameter tokens carry the logical axis "param_tokens" (the token axis) for the sharding rules.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

NORMS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")
# the normalisations for which zero key/value tokens leave the function unchanged exactly
GROWTH_PRESERVING = ("l2_norm_gelu", "gelu_l2_norm")
PARAM_NAMES = ("key_param_tokens", "value_param_tokens")
_EPS = 1e-12  # keeps the row norm of an all-zero row (x = 0) from dividing by zero


def default_zoom(norm: str, n: int) -> float:
    """The reference's scaling at n parameter tokens: sqrt(n) for the L2 modes, n for softmax
    (so softmax mode is n softmax(X K_P^T) V_P). Record it in the config at the initial size."""
    if norm not in NORMS:
        raise ValueError(f"pattention norm must be one of {', '.join(NORMS)}, got {norm!r}")
    return float(n) if norm == "softmax" else math.sqrt(n)


def theta(a, norm: str, zoom: float):
    """The normalisation Theta over the parameter-token axis (last). a: [..., n] -> [..., n]."""
    a = a.astype(jnp.float32)
    if norm == "l2_norm_gelu":
        # Theta(A) = GeLU(A / ||A||_2,row * zoom)  (TokenFormer eq. 5, fixed zoom)
        a = a * jax.lax.rsqrt(jnp.sum(a * a, axis=-1, keepdims=True) + _EPS)
        return jax.nn.gelu(a * zoom, approximate=False)
    if norm == "gelu_l2_norm":
        # Theta(A) = GeLU(A) / ||GeLU(A)||_2,row * zoom
        g = jax.nn.gelu(a, approximate=False)
        return g * jax.lax.rsqrt(jnp.sum(g * g, axis=-1, keepdims=True) + _EPS) * zoom
    if norm == "softmax":
        # Theta(A) = exp(A) / ||exp(A)||_1,row * zoom = zoom * softmax(A)
        return jax.nn.softmax(a, axis=-1) * zoom
    raise ValueError(f"pattention norm must be one of {', '.join(NORMS)}, got {norm!r}")


class Pattention(nnx.Module):
    """O = Theta(X K_P^T) V_P.

    x [..., d_in] -> [..., d_out]; key_param_tokens K_P [n, d_in], value_param_tokens V_P
    [n, d_out], both with logical axes ("param_tokens", None). zoom=0 uses default_zoom(norm, n)
    (not growth-preserving across runs unless the config records the number).
    """

    def __init__(self, d_in: int, d_out: int, num_param_tokens: int, *,
                 norm: str = "l2_norm_gelu", zoom: float = 0.0, key_std: float = 0.02,
                 value_std: float = 0.02, dtype=jnp.float32, rngs: nnx.Rngs):
        if norm not in NORMS:
            raise ValueError(f"pattention norm must be one of {', '.join(NORMS)}, got {norm!r}")
        if num_param_tokens < 1:
            raise ValueError(f"num_param_tokens must be >= 1, got {num_param_tokens}")
        self.norm = norm
        self.zoom = float(zoom) if zoom else default_zoom(norm, num_param_tokens)
        self.dtype = dtype
        init = nnx.initializers.normal
        # logical names only: the trainer's rules place the tokens on a mesh (models/lm/model.py), and
        # the layer also builds outside a mesh (tests, notebooks)
        with nnx.use_eager_sharding(False):
            self.key_param_tokens = nnx.Param(nnx.with_partitioning(
                init(key_std), ("param_tokens", None))(rngs.params(), (num_param_tokens, d_in),
                                                       jnp.float32))
            self.value_param_tokens = nnx.Param(nnx.with_partitioning(
                init(value_std), ("param_tokens", None))(rngs.params(),
                                                         (num_param_tokens, d_out), jnp.float32))

    @property
    def num_param_tokens(self) -> int:
        return self.key_param_tokens.shape[0]

    def __call__(self, x):
        k = self.key_param_tokens[...].astype(self.dtype)
        v = self.value_param_tokens[...].astype(self.dtype)
        a = jnp.einsum("...d,nd->...n", x.astype(self.dtype), k)  # A = X K_P^T: [..., n]
        w = theta(a, self.norm, self.zoom).astype(self.dtype)
        return jnp.einsum("...n,nd->...d", w, v)  # O = Theta(A) V_P: [..., d_out]


def grow_param_tokens(tokens, new_n: int, *, new_rows=None, name: str = "param tokens"):
    """[n, d] -> [new_n, d]: the old rows first, then `new_rows` [new_n - n, d] (default zeros).
    Raises ValueError when new_n < n."""
    n = tokens.shape[0]
    if new_n < n:
        raise ValueError(f"cannot shrink {name} from {n} to {new_n} parameter tokens: "
                         f"TokenFormer growth only appends tokens (new_n must be >= {n})")
    if new_rows is None:
        new_rows = jnp.zeros((new_n - n, *tokens.shape[1:]), tokens.dtype)
    return jnp.concatenate([jnp.asarray(tokens), jnp.asarray(new_rows, tokens.dtype)], axis=0)


def grow_pattention(state, new_n, *, fresh=None):
    """A pytree (nnx.State of a Pattention or of a model, or a dict) with every
    key_param_tokens leaf [n, d] grown to [new_n, d] by zero rows, and every
    value_param_tokens leaf by the rows past n of the same leaf of `fresh` (the same tree of
    the grown layer or model, freshly initialised), or by zero rows when fresh is None. Other
    leaves unchanged. new_n: an int, or a function of the leaf's path keys giving its count.

    Zero new keys alone preserve the function (Theta's new columns are 0 whatever V_new is).
    Zero new values as well would never train: the new tokens' gradients are
    dL/dV_new = Theta_new^T dO = 0 and dL/dK_new ∝ dO V_new^T = 0, a saddle (the LoRA argument:
    one factor zero, the other random). So pass `fresh` when the grown model is to be trained.
    Pure: returns a new tree. Raises ValueError on shrinking."""
    def one(path, leaf, new=None):
        keys = [getattr(k, "key", getattr(k, "name", k)) for k in path]
        if not keys or keys[-1] not in PARAM_NAMES:
            return leaf
        n = new_n(keys) if callable(new_n) else new_n
        where = jax.tree_util.keystr(path)
        value = leaf[...] if isinstance(leaf, nnx.Variable) else leaf
        rows = None
        if new is not None and keys[-1] == "value_param_tokens":
            rows = (new[...] if isinstance(new, nnx.Variable) else new)[value.shape[0]:n]
        grown = grow_param_tokens(value, n, new_rows=rows, name=where)
        return leaf.replace(grown) if isinstance(leaf, nnx.Variable) else grown

    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    if fresh is None:
        return jax.tree_util.tree_map_with_path(one, state, is_leaf=is_var)
    return jax.tree_util.tree_map_with_path(one, state, fresh, is_leaf=is_var)
