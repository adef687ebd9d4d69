"""ACT — Attention Calibration Technique (Yu et al., ICML 2024): inference-time, training-free.

On chosen heads, the causal attention map A = softmax(Q K^T / sqrt(d)) (causal mask) is
calibrated before it weighs the values:
  sink columns   S = {j : sum_i A_ij / (N - j) > alpha}   (the mean attention column j gets
                 from the N - j queries that can see it; 0-based j),
  A'_ij = beta A_ij                        for j in S,
  A'_ij = A_ij (1 + (1 - beta) m_i / r_i)  for j not in S, m_i = sum_{j in S} A_ij,
                                           r_i = sum_{j not in S} A_ij,
so every row keeps its mass (the removed sink mass goes to the row's non-sink tokens in
proportion to their attention). A row whose visible tokens are all sinks (r_i = 0, e.g. the
first query when token 0 is a sink) has nowhere to put the mass and is left as it is.
Defaults beta 0.4, alpha 0.1 (model.act_beta, model.act_alpha).

The layer shares SoftmaxAttention's parameters (q/k/v/o projections, GQA), so a trained softmax
checkpoint loads unchanged (`config.init_from`, or the head search's CLI). Heads not chosen
run SoftmaxAttention.attend bit for bit.

Which heads: model.act_heads, a tuple of "layer:head" strings (0-based), e.g.
`--config.model.act_heads=0:1,1:3` (a plain tuple of strings survives command-line overrides and
the JSON config saved with every checkpoint). The module learns its layer index from the family
that builds it (`attention.build(..., layer=i)`, registry.py); `assign_layers(model)` sets the
indices from the model's blocks explicitly.

Modes: "train" (a whole segment: training forward and evaluation) and "prefill" calibrate;
"decode" attends plainly over the cache (one query row cannot tell which columns are sinks:
that needs the column sums over every query, which decoding does not have).

Head search (the paper's offline step) lives with the LM family, whose runs it reads:
models/lm/act_search.py (`search_heads`, `python -m models.lm.act_search`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attention.registry import read_options, register
from attention.softmax import SoftmaxAttention


# ----------------------------------------------------------------------------- the calibration
def causal_attention_map(q, k, *, scale=None):
    """q [B, T, H, d], k [B, T, H_kv, d] -> A [B, H, T, T] f32: softmax(Q K^T / sqrt(d)) with the
    causal mask (entries above the diagonal are exactly 0)."""
    H, Hkv, T = q.shape[2], k.shape[2], q.shape[1]
    k = jnp.repeat(k, H // Hkv, axis=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # Vaswani et al. 2017, eq. 1: softmax(Q K^T / sqrt(d_k)), here causal
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    causal = jnp.tril(jnp.ones((T, T), bool))
    return jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)


def sink_columns(a, alpha: float):
    """a [..., T, T] causal map -> bool [..., T]: the sink columns of ACT."""
    T = a.shape[-1]
    seen_by = (T - jnp.arange(T)).astype(a.dtype)  # queries i >= j that see key j: N - j
    # ACT (Yu et al. 2024, sink detection): S = {j : sum_i A_ij / (N - j) > alpha}
    return a.sum(axis=-2) / seen_by > alpha


def calibrate(a, *, alpha: float = 0.1, beta: float = 0.4):
    """a [..., T, T] causal row-stochastic map -> the ACT-calibrated map (rows still sum to 1,
    causal zeros stay 0). beta = 1 returns `a` unchanged."""
    sink = sink_columns(a, alpha)[..., None, :]  # [..., 1, T]
    sink_mass = jnp.sum(jnp.where(sink, a, 0.0), axis=-1, keepdims=True)  # m_i
    rest_mass = jnp.sum(jnp.where(sink, 0.0, a), axis=-1, keepdims=True)  # r_i
    ok = rest_mass > 0  # somewhere to put the removed mass
    # ACT: A_ij <- beta A_ij on sinks; the removed (1 - beta) m_i goes to the row's other tokens
    # in proportion to their attention: A_ij <- A_ij (1 + (1 - beta) m_i / r_i)
    grow = 1.0 + (1.0 - beta) * sink_mass / jnp.where(ok, rest_mass, 1.0)
    out = jnp.where(sink, beta * a, a * grow)
    return jnp.where(ok, out, a)


def calibrated_attention(q, k, v, *, alpha: float, beta: float, scale=None):
    """Dense causal attention with every head calibrated: q [B, T, H, d], k, v [B, T, H_kv, d]
    -> [B, T, H, d]."""
    a = calibrate(causal_attention_map(q, k, scale=scale), alpha=alpha, beta=beta)
    v = jnp.repeat(v, q.shape[2] // v.shape[2], axis=2)
    return jnp.einsum("bhqk,bkhd->bqhd", a, v.astype(jnp.float32)).astype(q.dtype)


# ----------------------------------------------------------------------------- heads
def parse_heads(spec, *, num_layers: int | None = None, num_heads: int | None = None
                ) -> tuple[tuple[int, int], ...]:
    """("0:1", "1:3") (or "0:1,1:3", or (layer, head) pairs) -> ((0, 1), (1, 3)), sorted, checked
    against the model's size when given; a bad entry is a ValueError naming model.act_heads."""
    if isinstance(spec, str):
        spec = [s for s in spec.split(",") if s.strip()]
    out = set()
    for item in spec:
        try:
            if isinstance(item, str):
                layer, head = (int(p) for p in item.strip().split(":"))
            else:
                layer, head = (int(p) for p in item)
        except (TypeError, ValueError):
            raise ValueError(f"config.model.act_heads: bad entry {item!r}; allowed: "
                             "'layer:head' strings with 0-based integers, e.g. ('0:1', '1:3')"
                             ) from None
        if layer < 0 or head < 0 or (num_layers is not None and layer >= num_layers) or (
                num_heads is not None and head >= num_heads):
            raise ValueError(f"config.model.act_heads: {item!r} is outside the model "
                             f"(layers 0..{(num_layers or 1) - 1}, heads 0..{(num_heads or 1) - 1})")
        out.add((layer, head))
    return tuple(sorted(out))


def format_heads(heads) -> tuple[str, ...]:
    """((0, 1), (1, 3)) -> ("0:1", "1:3"): the config representation."""
    return tuple(f"{layer}:{head}" for layer, head in sorted(heads))


class ActHeads(nnx.Variable):
    """A head search's per-head switches of one layer (bool [H]); not a parameter, never saved."""


@register("act")
class ACTAttention(SoftmaxAttention):
    """SoftmaxAttention whose chosen heads attend with the ACT-calibrated map."""

    OPTION_PREFIX = "act"
    CONFIG_DEFAULTS = dict(act_heads=(), act_alpha=0.1, act_beta=0.4)
    OPTION_RULES = dict(act_alpha="[0, 1]", act_beta="[0, 1]")

    @staticmethod
    def validate_options(opt, cfg):
        parse_heads(opt["act_heads"], num_layers=getattr(cfg, "num_layers", None),
                    num_heads=getattr(cfg, "num_heads", None))

    def __init__(self, cfg, *, dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        opt = read_options(type(self), cfg)
        self.alpha, self.beta = opt["act_alpha"], opt["act_beta"]
        self.all_heads = parse_heads(opt["act_heads"], num_layers=getattr(cfg, "num_layers", None),
                                     num_heads=self.num_heads)
        self.set_layer(None)  # the model's attention.build(..., layer=i) sets it

    def set_layer(self, layer: int | None) -> None:
        """This module's layer index, which picks its heads out of model.act_heads (None: not
        known yet; calling the layer with act_heads set then fails)."""
        self.layer = None if layer is None else int(layer)
        self.heads = tuple(h for l, h in self.all_heads if l == self.layer)

    def attend(self, q, k, v, *, mode: str):
        plain = super().attend(q, k, v, mode=mode)
        switches = getattr(self, "act_switches", None)  # a head search's dynamic choice
        if switches is not None:
            cal = calibrated_attention(q, k, v, alpha=self.alpha, beta=self.beta)
            return jnp.where(switches.get_value()[None, None, :, None], cal, plain)
        if self.layer is None and self.all_heads:
            raise ValueError("ACT attention does not know its layer: build it with "
                             "attention.build(..., layer=i) (the families do) or call "
                             "act.assign_layers(model)")
        if not self.heads:
            return plain
        idx = jnp.asarray(self.heads)
        group = self.num_heads // self.num_kv_heads
        kv_idx = idx // group  # the key/value head each chosen query head reads
        cal = calibrated_attention(q[:, :, idx], k[:, :, kv_idx], v[:, :, kv_idx],
                                   alpha=self.alpha, beta=self.beta)
        return plain.at[:, :, idx].set(cal.astype(plain.dtype))


def act_layers(model) -> list[ACTAttention]:
    """The ACT attention modules of an LM, in block order."""
    return [b.attn for b in model.blocks if isinstance(b.attn, ACTAttention)]


def assign_layers(model) -> None:
    """Sets each ACT module's layer index from its block's position in model.blocks."""
    for i, block in enumerate(model.blocks):
        if isinstance(block.attn, ACTAttention):
            block.attn.set_layer(i)


def set_heads(model, heads) -> None:
    """Calibrates exactly `heads` ("layer:head" strings or (layer, head) pairs) of an ACT LM."""
    assign_layers(model)
    chosen = parse_heads(heads, num_layers=len(model.blocks))
    for attn in act_layers(model):
        attn.all_heads = chosen
        attn.set_layer(attn.layer)
