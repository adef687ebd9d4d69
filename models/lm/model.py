"""Decoder-only language model (byte level by default) and its Task.

Pre-norm Transformer: x + Attn(Norm(x)), then x + MLP(Norm(x)); RoPE and GQA live in the
attention module, which comes from the registry by `config.model.attention`, so every mechanism
of attention/ plugs in without touching this file. Defaults (Llama style): RMSNorm, SwiGLU,
RoPE, untied head. GPT-2 style, as the peers in ../shared/peers: `model.norm="layernorm"`,
`model.mlp="gelu"` (tanh GELU), `model.position="learned"` (with `rope_theta=0`),
`model.tie_embeddings=True` (configs/lm.py peer_a / peer_b); a GPT-2 checkpoint adds
`model.mlp_bias=True` and `model.softmax_bias=True` (biases on every linear layer but the head).

Shapes: tokens [B, T] int32 -> logits [B, T, vocab] float32.
"""
from __future__ import annotations

import functools
import math

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import attention
from attention.layers import LoRALinear, compute_dtype, dense, layer_norm, linear
from attention.ops.fusion import materialize, on_rows
from attention.ops.rope import ROPE_SCALINGS
from models.lm.hf import GPT2, LLAMA
from attention.sharding import constrain
from trainer.config import ConfigError
from trainer.text import (ByteCorpus, TokenWindows, is_shards, shard_tokens, text_files,
                          tokenized)
from trainer.tokenizer import Tokenizer, check_vocab, load_tokenizer
from trainer.task import Task, register_task



NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu")
POSITIONS = ("rope", "learned")


def rms_norm(d: int, *, dtype, rngs, eps: float = 1e-6):
    return nnx.RMSNorm(d, epsilon=eps, dtype=dtype, param_dtype=jnp.float32,
                       scale_init=nnx.with_partitioning(nnx.initializers.ones, ("norm",)), rngs=rngs)


def norm_layer(cfg, *, dtype, rngs):
    """config.model.norm: "rmsnorm" (default, eps 1e-6) or "layernorm" (scale and bias, eps
    1e-5); config.model.norm_eps > 0 sets the epsilon (Llama 3: 1e-5)."""
    eps = getattr(cfg, "norm_eps", 0.0)
    if getattr(cfg, "norm", "rmsnorm") == "rmsnorm":
        return rms_norm(cfg.d_model, dtype=dtype, rngs=rngs, eps=eps or 1e-6)
    return layer_norm(cfg.d_model, dtype=dtype, rngs=rngs, eps=eps or 1e-5)


class SwiGLU(nnx.Module):
    """FFN_SwiGLU(x) = (Swish(x W1) * x W3) W2  (Shazeer 2020, eq. 6); bias: a bias on each of
    the three (config.model.mlp_bias; none by default)."""

    def __init__(self, d: int, hidden: int, num_layers: int, *, dtype, rngs, bias: bool = False):
        self.w1 = linear(d, hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs, bias=bias)
        self.w3 = linear(d, hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs, bias=bias)
        self.w2 = linear(hidden, d, ("mlp", "embed"), dtype=dtype, rngs=rngs, bias=bias,
                         std=0.02 / (2 * num_layers) ** 0.5)

    def __call__(self, x):
        h = jax.nn.silu(self.w1(x)) * self.w3(x)
        return self.w2(constrain(h, ("batch", "length", "act_mlp")))


class GeluMLP(nnx.Module):
    """FFN(x) = GELU(x W_fc + b_fc) W_proj + b_proj with the tanh GELU (Hendrycks & Gimpel 2016,
    eq. in sec. 2; GPT-2's MLP); bias: the two biases (config.model.mlp_bias; GPT-2 has them,
    none by default)."""

    def __init__(self, d: int, hidden: int, num_layers: int, *, dtype, rngs, bias: bool = False):
        self.fc = linear(d, hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs, bias=bias)
        self.proj = linear(hidden, d, ("mlp", "embed"), dtype=dtype, rngs=rngs, bias=bias,
                           std=0.02 / (2 * num_layers) ** 0.5)

    def __call__(self, x):
        h = jax.nn.gelu(self.fc(x), approximate=True)
        return self.proj(constrain(h, ("batch", "length", "act_mlp")))


def add_lora(attn: nnx.Module, cfg, *, rngs) -> None:
    """Wraps the attention projections named by cfg.lora_targets ("q", "k", "v", "o") in
    LoRALinear (attention/layers.py, the PETL family's): the kernels keep their names, so a
    pretrained checkpoint loads, and only lora_a / lora_b are new."""
    for t in cfg.lora_targets:
        base = getattr(attn, f"{t}_proj", None)
        if not isinstance(base, nnx.Linear):
            raise ConfigError(f"config.model.lora_targets: {cfg.attention!r} attention has no "
                              f"{t}_proj projection; LoRA needs a mechanism with q/k/v/o "
                              "projections (softmax and those built on it)")
        setattr(attn, f"{t}_proj", LoRALinear(base, cfg.lora_rank, cfg.lora_alpha, rngs=rngs))


class Block(nnx.Module):
    def __init__(self, cfg, *, dtype, rngs, layer: int | None = None):
        self.attn_norm = norm_layer(cfg, dtype=dtype, rngs=rngs)
        self.attn = attention.build(cfg.attention, cfg, dtype=dtype, rngs=rngs, layer=layer)
        self.mlp_norm = norm_layer(cfg, dtype=dtype, rngs=rngs)
        mlp = SwiGLU if getattr(cfg, "mlp", "swiglu") == "swiglu" else GeluMLP
        self.mlp = mlp(cfg.d_model, cfg.mlp_dim, cfg.num_layers, dtype=dtype, rngs=rngs,
                       bias=bool(getattr(cfg, "mlp_bias", False)))
        if getattr(cfg, "lora_rank", 0):  # LoRA fine-tuning (Hu et al. 2022, eq. 3)
            add_lora(self.attn, cfg, rngs=rngs)

    def __call__(self, x, positions, cache, mode):
        h, cache = self.attn(self.attn_norm(x), positions=positions, cache=cache, mode=mode)
        x = constrain(x + h, ("batch", "length", "act_embed"))
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("batch", "length", "act_embed")), cache


class LM(nnx.Module):
    """cfg: config.model (vocab_size, d_model, num_layers, num_heads, num_kv_heads, head_dim,
    mlp_dim, rope_theta, attention; optional norm, norm_eps, mlp, mlp_bias, position + max_len,
    tie_embeddings)."""

    def __init__(self, cfg, *, dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
        self.remat = remat
        self.tied = bool(getattr(cfg, "tie_embeddings", False))
        # parameters carry logical axis names; the trainer's rules place them on a mesh
        with nnx.use_eager_sharding(False):
            # a tied head reads logits off the embedding: GPT-2's N(0, 0.02) keeps them small
            self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=jnp.float32,
                                   embedding_init=nnx.with_partitioning(
                                       nnx.initializers.normal(0.02 if self.tied else 1.0),
                                       ("vocab", "embed")), rngs=rngs)
            if getattr(cfg, "position", "rope") == "learned":
                self.pos_embed = nnx.Embed(cfg.max_len, cfg.d_model, dtype=dtype,
                                           param_dtype=jnp.float32,
                                           embedding_init=nnx.with_partitioning(
                                               nnx.initializers.normal(0.02), (None, "embed")),
                                           rngs=rngs)
            else:
                self.pos_embed = None
            self.blocks = nnx.List([Block(cfg, dtype=dtype, rngs=rngs, layer=i) for i in range(cfg.num_layers)])
            self.final_norm = norm_layer(cfg, dtype=dtype, rngs=rngs)
            self.lm_head = None if self.tied else dense(
                cfg.d_model, cfg.vocab_size, ("embed", "vocab"), dtype=dtype, rngs=rngs,
                std=1.0 / math.sqrt(cfg.d_model))

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> list:
        return [b.attn.init_cache(batch, max_len, dtype) for b in self.blocks]

    def __call__(self, tokens, *, positions=None, cache=None, mode: str = "train"):
        """tokens [B, T] -> (logits [B, T, V] f32, cache). positions default to 0..T-1."""
        B, T = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        x = constrain(x, ("batch", "length", "act_embed"))
        caches = cache if cache is not None else [None] * len(self.blocks)
        new_caches = []
        for block, c in zip(self.blocks, caches):
            if self.remat and mode == "train":
                x, c = nnx.remat(lambda b, x: b(x, positions, None, mode))(block, x)
            else:
                x, c = block(x, positions, c, mode)
            new_caches.append(c)
        x = self.final_norm(x)
        logits = (on_rows(lambda r: materialize(self.embed.attend(r)), x) if self.tied
                  else self.lm_head(x))
        logits = logits.astype(jnp.float32)
        return constrain(logits, ("batch", "length", "act_vocab")), \
            (new_caches if cache is not None else None)


# ----------------------------------------------------------------------------- generation
def sample_logits(logits, rng, *, temperature: float = 1.0, top_k: int = 0):
    """logits [B, V] -> tokens [B]: greedy at temperature 0, else softmax(logits / T) over the top k."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k"))
def _generate(graphdef, state, prompt, rng, *, max_new_tokens, temperature, top_k):
    model = nnx.merge(graphdef, state)
    B, P = prompt.shape
    cache = model.init_cache(B, P + max_new_tokens)
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    logits, cache = model(prompt, positions=positions, cache=cache, mode="prefill")
    rngs = jax.random.split(rng, max_new_tokens)
    first = sample_logits(logits[:, -1], rngs[0], temperature=temperature, top_k=top_k)

    def step(carry, xs):
        token, cache = carry
        pos, r = xs
        logits, cache = model(token[:, None], positions=jnp.full((B, 1), pos, jnp.int32),
                              cache=cache, mode="decode")
        nxt = sample_logits(logits[:, -1], r, temperature=temperature, top_k=top_k)
        return (nxt, cache), (nxt, logits[:, -1])

    positions = P + jnp.arange(max_new_tokens - 1, dtype=jnp.int32)
    _, (tokens, step_logits) = jax.lax.scan(step, (first, cache), (positions, rngs[1:]))
    tokens = jnp.concatenate([first[:, None], tokens.T], axis=1)
    all_logits = jnp.concatenate([logits[:, -1:], jnp.swapaxes(step_logits, 0, 1)], axis=1)
    return tokens, all_logits


def generate(model: LM, prompt, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
             rng=None, return_logits: bool = False):
    """KV-cached sampling in one jitted loop. prompt [B, P] int32 -> new tokens [B, N]
    (and the logits [B, N, V] each was sampled from, if return_logits)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    total = len(prompt[0]) + max_new_tokens
    if model.pos_embed is not None and total > model.pos_embed.num_embeddings:
        raise ValueError(f"prompt + max_new_tokens = {total} positions, but the model learned "
                         f"{model.pos_embed.num_embeddings} (model.max_len)")
    graphdef, state = nnx.split(model)
    rng = jax.random.key(0) if rng is None else rng
    tokens, logits = _generate(graphdef, state, jnp.asarray(prompt, jnp.int32), rng,
                               max_new_tokens=max_new_tokens, temperature=float(temperature),
                               top_k=int(top_k))
    return (tokens, logits) if return_logits else tokens


# ----------------------------------------------------------------------------- task
@register_task("lm")
class LMTask(Task):
    """Next-token prediction on text (embedded: the Python stdlib's source), as bytes or a
    tokenizer's ids (config.data.tokenizer), from text files or prepared shards."""

    throughput_unit = "tokens"
    _corpus = None  # read on first use
    _tokens = None
    hf_importers = {"LlamaForCausalLM": LLAMA, "GPT2LMHeadModel": GPT2}  # models/lm/hf.py
    FIELD_RULES = {
        "model.vocab_size": ">= 1",  # >= the tokenizer's vocabulary (validate_data)
        "model.num_layers": ">= 1", "model.d_model": ">= 1", "model.num_heads": ">= 1",
        "model.num_kv_heads": ">= 1", "model.mlp_dim": ">= 1",
        "model.head_dim": ">= 0",  # 0: d_model // num_heads
        "model.rope_theta": ">= 0",  # 0: no RoPE
        "model.max_len": ">= 0",  # learned positions only
        "model.norm": NORMS, "model.mlp": MLPS, "model.position": POSITIONS,
        "model.mlp_bias": (False, True),  # biases on the MLP's linear layers (GPT-2)
        "model.norm_eps": ">= 0",  # 0: the norm's default
        "model.lora_rank": ">= 0",  # 0: no LoRA
        "model.lora_alpha": "> 0", "model.lora_targets": ("q", "k", "v", "o"),
        "model.rope_scaling": ROPE_SCALINGS, "model.rope_scaling_factor": ">= 1",
        "model.rope_low_freq_factor": "> 0", "model.rope_high_freq_factor": "> 0",
        "model.rope_original_max_len": ">= 1",
        "data.seq_len": ">= 1",
        "sample.max_new_tokens": ">= 0",  # 0: no sample at the end of training
        "sample.temperature": ">= 0",  # 0: greedy
        "sample.top_k": ">= 0",  # 0: the whole vocabulary
    }

    def validate(self, mesh_sizes):
        m, tp = self.config.model, mesh_sizes["tensor"]
        bad = [f"config.model.{field}={m[field]} is not divisible by the tensor axis "
               f"mesh.tensor={tp}; allowed: tensor sizes dividing it"
               for field in ("num_heads", "num_kv_heads") if m[field] % tp]
        if bad:
            raise ConfigError("\n".join(bad))
        if m.num_heads % m.num_kv_heads:
            raise ConfigError(f"config.model.num_heads={m.num_heads} must be a multiple of "
                              f"config.model.num_kv_heads={m.num_kv_heads}")
        hd = m.head_dim or m.d_model // m.num_heads
        if not m.head_dim and m.d_model % m.num_heads:
            raise ConfigError(f"config.model.d_model={m.d_model} is not divisible by "
                              f"num_heads={m.num_heads}; set model.head_dim explicitly")
        if m.get("rope_scaling") and m.rope_high_freq_factor <= m.rope_low_freq_factor:
            raise ConfigError(f"config.model.rope_high_freq_factor={m.rope_high_freq_factor} must "
                              f"be > rope_low_freq_factor={m.rope_low_freq_factor}")
        if m.get("position", "rope") == "learned":
            if m.rope_theta:
                raise ConfigError("config.model.position='learned' adds absolute position "
                                  "embeddings: set model.rope_theta=0 (no RoPE as well)")
            if m.get("max_len", 0) < self.config.data.seq_len:
                raise ConfigError(f"config.model.max_len={m.get('max_len', 0)} (learned "
                                  f"positions) must be >= data.seq_len={self.config.data.seq_len}")
        elif hd % 2:
            raise ConfigError(f"config.model.head_dim={hd} must be even (RoPE rotates pairs)")
        try:
            attention.get(m.attention)
        except KeyError as e:
            raise ConfigError(f"config.model.attention: {e.args[0]}") from None
        self.validate_data()

    def validate_data(self):
        """The text data's fields (shared by the token-level families): the paths, the
        tokenizer, the model's vocabulary against it, pre-tokenized shards against it."""
        d = self.config.data
        if d.paths and not is_shards(d.paths):
            text_files(d.paths)  # raises on missing paths and empty directories
        check_vocab(self.tokenizer, self.config.model.vocab_size)
        if is_shards(d.paths):
            shard_tokens(d.paths[0], self.tokenizer)  # the manifest, the files, the tokenizer

    def build_model(self, rngs):
        t = self.config.train
        return LM(self.config.model, dtype=compute_dtype(t.compute_dtype), remat=t.remat, rngs=rngs)

    @property
    def tokenizer(self) -> Tokenizer:
        """config.data.tokenizer's (trainer/tokenizer.py; "bytes" when the config predates it)."""
        return load_tokenizer(self.config.data.get("tokenizer", "bytes"))

    @property
    def corpus(self) -> ByteCorpus:
        if self._corpus is None:
            self._corpus = ByteCorpus.from_config(self.config.data.paths)
        return self._corpus

    @property
    def tokens(self):
        """(train ids, eval ids): prepared shards (data.paths naming one), else the text files
        (or the embedded corpus) tokenized now, once."""
        if self._tokens is None:
            paths = self.config.data.paths
            self._tokens = shard_tokens(paths[0], self.tokenizer) if is_shards(paths) else \
                tokenized(self.corpus, self.tokenizer)
        return self._tokens

    def _describe(self, split: str) -> str:
        paths = self.config.data.paths
        if not paths:
            return f"the embedded corpus's {split} split"
        if is_shards(paths):
            return f"the {split} split of the shards config.data.paths={tuple(paths)}"
        return f"{self.corpus.describe(split)} in config.data.paths={tuple(paths)}"

    def _windows(self, split: str) -> TokenWindows:
        data = self.tokens[split == "eval"]
        unit = "bytes" if self.tokenizer.spec == "bytes" else "tokens"
        return TokenWindows(data, self.config.data.seq_len, self._describe(split), unit)

    def train_data(self):
        return grain.MapDataset.source(self._windows("train")).shuffle(
            seed=self.config.seed).repeat(None)

    def eval_data(self):
        return grain.MapDataset.source(self._windows("eval")).shuffle(seed=1234)

    def units_per_example(self):
        return self.config.data.seq_len

    def loss(self, model, batch):
        tokens = batch["tokens"]
        logits, _ = model(tokens[:, :-1])
        # mean next-token cross entropy, nats per byte ("nll": the loss without the auxiliary
        # losses the trainer adds, loss_with_aux)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1)[..., 0]
        loss = nll.mean()
        metrics = {"nll": loss}
        if self.tokenizer.spec != "bytes":
            # the text bytes each target token stands for: bits per byte stay comparable
            # across tokenizers (every batch holds the same number of tokens, so the mean of
            # the batch means is the corpus ratio)
            metrics["bytes_per_token"] = jnp.asarray(self._token_bytes)[tokens[:, 1:]].mean(
                dtype=jnp.float32)
        return loss, metrics

    @functools.cached_property
    def _token_bytes(self) -> np.ndarray:
        return self.tokenizer.token_bytes()

    def eval_summary(self, metrics):
        loss = metrics.get("nll", metrics["loss"])  # without auxiliary (distillation) losses
        per_byte = loss / max(metrics.get("bytes_per_token", 1.0), 1e-9)
        return dict(metrics, bits_per_byte=per_byte / math.log(2),
                    perplexity=math.exp(min(loss, 50.0)))

    def on_fit_end(self, model, log):
        s = self.config.sample
        if not s.max_new_tokens:
            return
        tok = self.tokenizer
        ids = tok.encode(s.prompt)
        if tok.bos_id is not None and tok.bos_id != tok.eos_id:
            ids = [tok.bos_id] + ids
        prompt = jnp.asarray([ids], jnp.int32)
        out = generate(model, prompt, s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                       rng=jax.random.key(self.config.seed))
        text = tok.decode(np.asarray(out[0]))
        log(f"sample (temperature={s.temperature}, top_k={s.top_k}):\n{s.prompt}{text}")
