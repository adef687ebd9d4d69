"""TokenFormer language model (Wang et al., ICLR 2025) and its Task.

Every projection is a Pattention (attention/pattention.py) over parameter tokens: q, k, v and
the attention output with `model.param_tokens` tokens each, and the FFN, which the paper
replaces by a single Pattention d_model -> d_model (sec. 3.3), with `model.ffn_param_tokens`.
Token-token mixing stays causal softmax attention (RoPE optional, `model.rope_theta`, 0 = off);
norms are non-parametric LayerNorm, so all trainable parameters of the blocks are parameter
tokens, and growing them (grow_tokenformer, or init_from a smaller run: TokenFormerTask's
adapt_init_from) preserves the function (attention/pattention.py).

Block: x + Attn(LN(x)), then x + Pattention_ffn(LN(x)).
Shapes: tokens [B, T] int32 -> logits [B, T, vocab] float32.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from attention.layers import compute_dtype, dense
from attention.ops.rope import apply_rope
from attention.pattention import NORMS, PARAM_NAMES, Pattention, grow_param_tokens, grow_pattention
from attention.sharding import constrain
from models.lm import LMTask, sample_logits
from trainer.config import ConfigError
from trainer.task import register_task



def layer_norm(x, eps: float = 1e-5):
    """Non-parametric LayerNorm (no scale, no bias): (x - mean) / sqrt(var + eps), in f32.
    x [..., D] -> [..., D] in x.dtype."""
    xf = x.astype(jnp.float32)
    xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def pattention(cfg, n: int, zoom: float, *, value_std: float = 0.02, dtype, rngs):
    return Pattention(cfg.d_model, cfg.d_model, n, norm=cfg.pattention_norm, zoom=zoom,
                      value_std=value_std, dtype=dtype, rngs=rngs)


class TokenFormerAttention(nnx.Module):
    """x [B, T, D] -> [B, T, D]: Q, K, V = Pattention_q/k/v(x) (TokenFormer eq. 6), causal
    softmax(Q K^T / sqrt(d_h)) V over heads, then Pattention_o."""

    def __init__(self, cfg, *, dtype, rngs):
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.d_model // cfg.num_heads
        self.rope_theta = cfg.rope_theta
        n, zoom = cfg.param_tokens, cfg.pattention_zoom
        self.q = pattention(cfg, n, zoom, dtype=dtype, rngs=rngs)
        self.k = pattention(cfg, n, zoom, dtype=dtype, rngs=rngs)
        self.v = pattention(cfg, n, zoom, dtype=dtype, rngs=rngs)
        # residual-branch outputs start small (GPT-2's 0.02 / sqrt(2 L)), as in models/lm/model.py
        self.o = pattention(cfg, n, zoom, value_std=0.02 / math.sqrt(2 * cfg.num_layers),
                            dtype=dtype, rngs=rngs)

    def __call__(self, x, positions):
        B, T, _ = x.shape
        heads = lambda y: y.reshape(B, T, self.num_heads, self.head_dim)  # noqa: E731
        q = apply_rope(heads(self.q(x)), positions, theta=self.rope_theta)
        k = apply_rope(heads(self.k(x)), positions, theta=self.rope_theta)
        o = jax.nn.dot_product_attention(q, k, heads(self.v(x)), is_causal=True)
        return self.o(o.reshape(B, T, -1))


class Block(nnx.Module):
    def __init__(self, cfg, *, dtype, rngs):
        self.attn = TokenFormerAttention(cfg, dtype=dtype, rngs=rngs)
        self.ffn = pattention(cfg, cfg.ffn_param_tokens, cfg.ffn_pattention_zoom,
                              value_std=0.02 / math.sqrt(2 * cfg.num_layers), dtype=dtype,
                              rngs=rngs)

    def __call__(self, x, positions):
        x = constrain(x + self.attn(layer_norm(x), positions), ("batch", "length", "act_embed"))
        # O_ffn = Pattention(LN(X), K_P^ffn, V_P^ffn)  (the FFN as one Pattention, sec. 3.3)
        return constrain(x + self.ffn(layer_norm(x)), ("batch", "length", "act_embed"))


class TokenFormer(nnx.Module):
    """cfg: config.model (vocab_size, d_model, num_layers, num_heads, rope_theta, param_tokens,
    ffn_param_tokens, pattention_norm, pattention_zoom, ffn_pattention_zoom; zooms 0 = the
    default at this model's own token counts, which does not preserve the function on growth)."""

    def __init__(self, cfg, *, dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
        self.remat = remat
        # parameters carry logical axis names; the trainer's rules place them on a mesh
        with nnx.use_eager_sharding(False):
            self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype,
                                   param_dtype=jnp.float32,
                                   embedding_init=nnx.with_partitioning(
                                       nnx.initializers.normal(1.0), ("vocab", "embed")),
                                   rngs=rngs)
            self.blocks = nnx.List([Block(cfg, dtype=dtype, rngs=rngs)
                                    for _ in range(cfg.num_layers)])
            self.lm_head = dense(cfg.d_model, cfg.vocab_size, ("embed", "vocab"), dtype=dtype,
                                 rngs=rngs, std=1.0 / math.sqrt(cfg.d_model))

    def __call__(self, tokens, *, positions=None):
        """tokens [B, T] -> (logits [B, T, V] f32, None); positions default to 0..T-1. The None
        stands for the cache of models/lm/model.py's call shape (TokenFormer decodes without one)."""
        B, T = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x = constrain(self.embed(tokens), ("batch", "length", "act_embed"))
        for block in self.blocks:
            if self.remat:
                x = nnx.remat(lambda b, x: b(x, positions))(block, x)
            else:
                x = block(x, positions)
        logits = self.lm_head(layer_norm(x)).astype(jnp.float32)
        return constrain(logits, ("batch", "length", "act_vocab")), None


def grow_tokenformer(state, *, param_tokens: int, ffn_param_tokens: int, fresh=None):
    """The nnx.State (or state dict) of a TokenFormer with every attention Pattention grown to
    param_tokens and every FFN Pattention to ffn_param_tokens parameter tokens: old tokens in
    the first rows; new keys zero, new values from `fresh` (the Param state of a TokenFormer
    built with the larger counts, so the grown model trains: grow_pattention), else zero. Load
    it into a TokenFormer built with the larger counts and the same zooms. Raises ValueError on
    shrinking."""
    if "blocks" not in state:
        raise ValueError("grow_tokenformer: the state has no 'blocks' (not a TokenFormer)")

    return grow_pattention(
        state, lambda keys: ffn_param_tokens if "ffn" in keys else param_tokens, fresh=fresh)


@register_task("tokenformer")
class TokenFormerTask(LMTask):
    """Next-byte prediction with a TokenFormer: models/lm/model.py's data, loss and metrics."""

    FIELD_RULES = {
        # token-token mixing is causal softmax attention (the projections are Pattentions)
        "model.attention": ("softmax",),
        "model.pattention_norm": NORMS,
        "model.param_tokens": ">= 1", "model.ffn_param_tokens": ">= 1",
        # 0: the default at the current token count
        "model.pattention_zoom": ">= 0", "model.ffn_pattention_zoom": ">= 0",
    }

    def validate(self, mesh_sizes):
        m, tp = self.config.model, mesh_sizes["tensor"]
        if m.num_heads % tp:
            raise ConfigError(f"config.model.num_heads={m.num_heads} is not divisible by the "
                              f"tensor axis mesh.tensor={tp}")
        if m.d_model % m.num_heads:
            raise ConfigError(f"config.model.d_model={m.d_model} is not divisible by "
                              f"num_heads={m.num_heads}")
        if m.rope_theta and (m.d_model // m.num_heads) % 2:
            raise ConfigError(f"config.model: head_dim={m.d_model // m.num_heads} must be even "
                              f"(RoPE rotates pairs); or set model.rope_theta=0")
        self.validate_data()

    # ---- growth: init_from a smaller TokenFormer run (trainer.Trainer._init_from)
    # fields that must match for the grown model to compute the source's function
    SAME_ON_GROWTH = ("vocab_size", "d_model", "num_layers", "num_heads", "rope_theta",
                      "pattention_norm", "pattention_zoom", "ffn_pattention_zoom")

    def check_init_from(self, source_config):
        task = source_config.get("task")
        if task != "tokenformer":
            raise ConfigError(
                f"config.init_from: the source is a {task!r} run, not a TokenFormer; a TokenFormer "
                "grows only from a smaller TokenFormer run's checkpoint (parameter tokens are "
                "appended; other models have none to append to)")
        src, m = source_config["model"], self.config.model
        for field in self.SAME_ON_GROWTH:
            if src.get(field) != m[field]:
                raise ConfigError(
                    f"config.model.{field}={m[field]!r}, but the source run has {src.get(field)!r}: "
                    "TokenFormer growth appends parameter tokens and keeps everything else "
                    f"(set --config.model.{field}={src.get(field)!r})")
        for field in ("param_tokens", "ffn_param_tokens"):
            if m[field] < src[field]:
                raise ConfigError(
                    f"config.model.{field}={m[field]} is smaller than the source run's "
                    f"{src[field]}: cannot shrink a TokenFormer (growth only appends tokens; "
                    f"allowed: >= {src[field]})")

    def adapt_init_from(self, name, source, target):
        """Parameter tokens [n, d] -> [n', d], and their optimizer moments alike: the old rows,
        then new rows that are zero for the keys (the function carries over exactly) and this
        run's fresh values otherwise (initial value tokens, so the new tokens train; zero
        moments). See attention/pattention.py grow_pattention."""
        last = name.rsplit("/", 1)[-1]
        if last not in PARAM_NAMES or tuple(source.shape[1:]) != tuple(target.shape[1:]):
            return None
        try:
            return grow_param_tokens(
                source, target.shape[0], name=name,
                new_rows=None if last == "key_param_tokens" else target[source.shape[0]:])
        except ValueError as e:
            raise ConfigError(f"config.init_from: {e}") from None

    def build_model(self, rngs):
        t = self.config.train
        return TokenFormer(self.config.model, dtype=compute_dtype(t.compute_dtype), remat=t.remat,
                           rngs=rngs)

    def on_fit_end(self, model, log):
        s = self.config.sample
        if not s.max_new_tokens:
            return
        prompt = list(s.prompt.encode("utf-8"))
        total = len(prompt) + s.max_new_tokens
        graphdef, state = nnx.split(model)
        # no KV cache: each step reruns the causal model on a fixed-length buffer (one compile)
        forward = jax.jit(lambda state, t: nnx.merge(graphdef, state)(t)[0])
        tokens = jnp.zeros((1, total), jnp.int32).at[0, :len(prompt)].set(jnp.asarray(prompt))
        rng = jax.random.key(self.config.seed)
        for i in range(len(prompt), total):
            rng, r = jax.random.split(rng)
            nxt = sample_logits(forward(state, tokens)[:, i - 1], r, temperature=s.temperature,
                                top_k=s.top_k)
            tokens = tokens.at[0, i].set(nxt[0])
        text = bytes(int(t) for t in tokens[0, len(prompt):]).decode("utf-8", errors="replace")
        log(f"sample (temperature={s.temperature}, top_k={s.top_k}):\n{s.prompt}{text}")
