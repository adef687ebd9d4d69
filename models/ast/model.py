"""Audio Spectrogram Transformer (Gong et al., Interspeech 2021) and parameter-efficient
transfer of a frozen AST (Cappellazzo et al. 2024, "PETL for Audio Spectrogram Transformers").

Task "ast": waveform [B, N] -> (models/ast/audio.py `front_end`, inside the jitted step) Kaldi
log-mel filterbank [B, T, F], SpecAugment on training batches, (x - mean) / (2 std) -> AST ->
logits. The front end lives in the Task, so the model's input is the normalised spectrogram.

AST: the spectrogram as a 1-channel (frequency, time) image, overlapping p x p patches with
strides (fstride, tstride) (16 x 16 and 10, 10 in the paper: a 128 x 1024 input gives 12 x 101
patches) embedded by one strided conv; a CLS and a distillation token; learned position
embeddings for the 2 + f*t tokens; pre-norm blocks (attention from the registry, bidirectional);
final LN; pooled = (x_cls + x_dist) / 2 (`model.pool="cls_dist"`, AST) or the mean of all
tokens (`"mean"`, PETL_AST's `final_output: 'ALL'`) -> `classifier` (models/vit.py
ImageClassifier).

`model.norm_eps` sets the LayerNorms' epsilon (0: 1e-6), `model.classifier_norm` a LayerNorm
before the classifier (models/vit.py ImageClassifier): with pool "cls_dist" and softmax_bias,
Hugging Face's ASTForAudioClassification, which models/ast/hf.py imports and exports.

Loading a checkpoint trained with another `data.target_length` adapts the position embeddings
in time (`adapt_init_from`): a centre cut when shorter, linear interpolation when longer (AST's
AudioSet -> short-clip recipe); the frequency grid must match.

PETL (`model.petl`), each a config switch on a backbone loaded with `init_from`; the config
sets `train.trainable` to the method's parameters (configs/ast.py PETL):
  full       everything trains;
  linear     only the classifier;
  bitfit     biases (LayerNorms, MLP, patch embedding) + classifier (Ben Zaken et al. 2022;
             the registry's attention projections have no biases);
  adapter    bottleneck adapters A(z) = W_up GELU(W_down z + b_d) + b_u, d -> d/r -> d
             (Houlsby et al. 2019), `adapter_placement` "parallel" (sublayer(z) + A(z), He et
             al. 2022) or "sequential" (h + A(h) on the sublayer output h), on the MHSA, the FFN
             or both (`adapter_location`);
  conformer  the Conformer convolution module as the adapter (Gulati et al. 2020; PETL_AST's
             best): PW(d -> 2h) -> GLU -> depthwise conv (kernel k, over the token sequence) ->
             LN -> Swish -> PW(h -> d), same placements;
  lora       W x + (alpha / r) B A x on W_q and W_v (Hu et al. 2022, eq. 3);
  prompt     deep prompts: L learned tokens per layer that every token attends to through the
             layer's own W_q, W_k, W_v, W_o, added with a per-head gate (zero-init attention,
             Zhang et al. 2023 "LLaMA-Adapter", eq. 8).
Step-0 equivalence with the frozen model and non-zero gradients: every method's last map starts
at zero (adapters' W_up and b_up, LoRA's B, the prompt gate), its other weights random. At step
0 only that last map has a gradient (the rest sit behind a zero); after one step all do. PETL_AST
zero-initialises *both* adapter projections, where only the up bias ever learns (FAMILIES.md).
Prompts differ from VPT-deep (tokens inserted into the sequence, which changes the output at
step 0): the gated form keeps the frozen output at step 0, as this family promises for every
method.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import attention
from attention.layers import LoRALinear, Mlp, compute_dtype, layer_norm, linear, param
from attention.ops.fusion import materialize
from attention.sharding import constrain
from models.ast import audio, hf
from models.vit import ClassificationTask, norm, token_positions
from trainer.config import ConfigError
from trainer.data import embedded_dir
from trainer.task import register_task

POOLS = ("cls_dist", "mean")
PETL = ("full", "linear", "bitfit", "adapter", "conformer", "lora", "prompt")
PLACEMENTS = ("parallel", "sequential")
LOCATIONS = ("mhsa", "ffn", "both")
# the parameters each method trains (configs/ast.py sets train.trainable from it)
PETL_TRAINABLE = {"full": "", "linear": "^classifier", "bitfit": "bias|^classifier",
                  "adapter": "adapter|^classifier", "conformer": "adapter|^classifier",
                  "lora": "lora_|^classifier", "prompt": "prompt|^classifier"}
# the parameters a method adds to the pretrained backbone (config.init_from_new)
PETL_NEW = {"adapter": "adapter", "conformer": "adapter", "lora": "lora_", "prompt": "prompt"}


# ----------------------------------------------------------------------------- PETL modules
class Adapter(nnx.Module):
    """Bottleneck adapter A(z) = W_up GELU(W_down z + b_down) + b_up (Houlsby et al. 2019),
    d -> d / r -> d. W_up, b_up start at zero: A = 0, dL/dW_up = GELU(.)^T dL/dA != 0.
    z [..., D] -> [..., D]."""

    def __init__(self, d: int, hidden: int, *, dtype, rngs):
        self.down = linear(d, hidden, ("embed", None), dtype=dtype, rngs=rngs, std=None)
        self.up = linear(hidden, d, (None, "embed"), dtype=dtype, rngs=rngs, std=0)

    def __call__(self, z):
        return self.up(jax.nn.gelu(self.down(z), approximate=False))


class ConformerAdapter(nnx.Module):
    """The Conformer convolution module as an adapter (Gulati et al. 2020, fig. 2; PETL_AST):
    PW1 (d -> 2h) -> GLU -> depthwise conv over tokens (kernel k, 'SAME') -> LayerNorm -> Swish
    -> PW2 (h -> d, zero init). LayerNorm replaces the original BatchNorm: no running statistics
    to carry through a frozen backbone's checkpoint. z [B, N, D] -> [B, N, D]."""

    def __init__(self, d: int, hidden: int, kernel: int, *, dtype, rngs):
        self.pw1 = linear(d, 2 * hidden, ("embed", None), dtype=dtype, rngs=rngs, std=None)
        self.dw = nnx.Conv(hidden, hidden, kernel_size=(kernel,), feature_group_count=hidden,
                           padding="SAME", dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.norm = layer_norm(hidden, dtype=dtype, rngs=rngs)
        self.pw2 = linear(hidden, d, (None, "embed"), dtype=dtype, rngs=rngs, std=0)

    def __call__(self, z):
        a, g = jnp.split(self.pw1(z), 2, axis=-1)
        h = self.dw(a * jax.nn.sigmoid(g))  # GLU (Dauphin et al. 2017)
        return self.pw2(jax.nn.silu(self.norm(h)))


class DeepPrompt(nnx.Module):
    """L prompt tokens P [L, D] for one layer, attended through the layer's own projections
    with a separate softmax and a zero-initialised per-head gate g (LLaMA-Adapter eq. 8):
        out = W_o concat_h( g_h softmax(q_h (P W_k)_h^T / sqrt(d_h)) (P W_v)_h ).
    Added to the layer's attention output; 0 at init, and dL/dg != 0."""

    def __init__(self, length: int, d: int, num_heads: int, *, rngs):
        self.tokens = param(rngs, nnx.initializers.normal(0.02), (length, d), (None, "embed"))
        self.gate = param(rngs, nnx.initializers.zeros, (num_heads,), (None,))

    def __call__(self, attn, z):
        """attn: the layer's attention (q_proj, k_proj, v_proj, o_proj, num_heads,
        num_kv_heads, head_dim); z [B, N, D] its (normalised) input -> [B, N, D]."""
        B, N, _ = z.shape
        H, Hkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
        p = self.tokens[...].astype(z.dtype)
        q = attn.q_proj(z).reshape(B, N, H, hd)
        k = jnp.repeat(attn.k_proj(p).reshape(-1, Hkv, hd), H // Hkv, axis=1)
        v = jnp.repeat(attn.v_proj(p).reshape(-1, Hkv, hd), H // Hkv, axis=1)
        s = jnp.einsum("bnhd,lhd->bhnl", q, k).astype(jnp.float32) / math.sqrt(hd)
        o = jnp.einsum("bhnl,lhd->bnhd", jax.nn.softmax(s, axis=-1).astype(z.dtype), v)
        o = o * self.gate[...].astype(z.dtype)[None, None, :, None]
        return attn.o_proj(o.reshape(B, N, H * hd))


def _projections(attn) -> bool:
    return all(isinstance(getattr(attn, n, None), nnx.Linear)
               for n in ("q_proj", "k_proj", "v_proj", "o_proj"))


# ----------------------------------------------------------------------------- AST
class Block(nnx.Module):
    """Pre-norm block x + Attn(LN x), x + MLP(LN x), with the PETL modules of cfg.petl.
    x [B, N, D] -> [B, N, D]."""

    def __init__(self, cfg, *, dtype, rngs, layer: int | None = None):
        d = cfg.d_model
        self.attn_norm = norm(d, cfg, dtype=dtype, rngs=rngs)
        self.attn = attention.build(cfg.attention, cfg, dtype=dtype, rngs=rngs, layer=layer)
        self.mlp_norm = norm(d, cfg, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(d, cfg.mlp_dim, dtype=dtype, rngs=rngs)
        petl = cfg.petl
        if petl in ("lora", "prompt") and not _projections(self.attn):
            raise ConfigError(f"config.model.petl={petl!r} works through the attention's "
                              f"q/k/v/o projections, which {cfg.attention!r} does not expose; "
                              "use attention='softmax' (or a mechanism built on it)")
        if petl == "lora":  # Wq and Wv (PETL_AST, after LoRA's own choice)
            self.attn.q_proj = LoRALinear(self.attn.q_proj, cfg.lora_rank, cfg.lora_alpha,
                                          rngs=rngs)
            self.attn.v_proj = LoRALinear(self.attn.v_proj, cfg.lora_rank, cfg.lora_alpha,
                                          rngs=rngs)
        self.prompt = (DeepPrompt(cfg.prompt_length, d, self.attn.num_heads, rngs=rngs)
                       if petl == "prompt" else None)
        self.placement = cfg.adapter_placement
        hidden = max(1, d // cfg.adapter_reduction)

        def make():
            if petl == "adapter":
                return Adapter(d, hidden, dtype=dtype, rngs=rngs)
            return ConformerAdapter(d, hidden, cfg.conformer_kernel, dtype=dtype, rngs=rngs)
        on = petl in ("adapter", "conformer")
        self.adapter_mhsa = make() if on and cfg.adapter_location in ("mhsa", "both") else None
        self.adapter_ffn = make() if on and cfg.adapter_location in ("ffn", "both") else None

    def _adapt(self, adapter, z, h):
        """The sublayer output h of input z with the adapter in its placement."""
        if adapter is None:
            return h
        return h + adapter(z if self.placement == "parallel" else h)

    def __call__(self, x):
        z = self.attn_norm(x)
        h, _ = self.attn(z, positions=token_positions(*x.shape[:2]))
        if self.prompt is not None:
            h = h + self.prompt(self.attn, z)
        x = constrain(x + self._adapt(self.adapter_mhsa, z, h), ("batch", "length", "act_embed"))
        z = self.mlp_norm(x)
        x = x + self._adapt(self.adapter_ffn, z, self.mlp(z))
        return constrain(x, ("batch", "length", "act_embed"))


def patch_grid(num_frames: int, num_bins: int, cfg) -> tuple[int, int]:
    """(f, t): patches along frequency and time of a [num_frames, num_bins] spectrogram."""
    p = cfg.patch_size
    return (num_bins - p) // cfg.fstride + 1, (num_frames - p) // cfg.tstride + 1


class AST(nnx.Module):
    """cfg: config.model (patch_size, fstride, tstride, d_model, num_layers, num_heads, ...,
    pool, petl fields). fbank [B, T, F] (normalised) -> (tokens [B, 2 + f t, D] after the
    final LN, pooled [B, D])."""

    NUM_SPECIAL = 2  # CLS and distillation tokens

    def __init__(self, cfg, num_frames: int, num_bins: int, *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.dim, self.pool = cfg.d_model, cfg.pool
        self.grid = patch_grid(num_frames, num_bins, cfg)
        d, p = cfg.d_model, cfg.patch_size
        with nnx.use_eager_sharding(False):
            self.patch_embed = nnx.Conv(
                1, d, kernel_size=(p, p), strides=(cfg.fstride, cfg.tstride), padding="VALID",
                dtype=dtype, param_dtype=jnp.float32,
                kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                                  (None, None, None, "embed")),
                bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("embed",)), rngs=rngs)
            self.cls = param(rngs, nnx.initializers.normal(0.02), (1, 2, d), (None, None, "embed"))
            self.pos_embed = param(rngs, nnx.initializers.normal(0.02),
                                   (self.NUM_SPECIAL + math.prod(self.grid), d), (None, "embed"))
            self.blocks = nnx.List([Block(cfg, dtype=dtype, rngs=rngs, layer=i)
                                    for i in range(cfg.num_layers)])
            self.final_norm = norm(d, cfg, dtype=dtype, rngs=rngs)

    def __call__(self, fbank):
        B = fbank.shape[0]
        # AST: frequency is the image height, time its width; one input channel
        x = self.patch_embed(jnp.swapaxes(fbank, 1, 2)[..., None])  # [B, f, t, D]
        x = x.reshape(B, -1, x.shape[-1])  # row-major over (f, t)
        special = jnp.broadcast_to(self.cls[...].astype(x.dtype), (B, 2, x.shape[-1]))
        x = jnp.concatenate([special, x], axis=1) + self.pos_embed[...].astype(x.dtype)
        x = constrain(x, ("batch", "length", "act_embed"))
        for block in self.blocks:
            x = block(x)
        x = self.final_norm(x)
        pooled = (x[:, 0] + x[:, 1]) / 2 if self.pool == "cls_dist" else x.mean(axis=1)
        return x, pooled


def adapt_pos_embed(source, f: int, t_target: int, num_special: int = AST.NUM_SPECIAL):
    """Position embeddings [S + f t_s, D] -> [S + f t_target, D] over the (f, t) patch grid:
    the centre t_target columns when shorter, linear interpolation in time when longer
    (AST's ast_models.py, AudioSet -> other lengths); identical when t_s == t_target."""
    source = jnp.asarray(source)
    special, grid = source[:num_special], source[num_special:]
    D = source.shape[-1]
    if grid.shape[0] % f:
        raise ConfigError(f"position embeddings of {grid.shape[0]} patches do not form a grid "
                          f"with {f} frequency rows")
    t_source = grid.shape[0] // f
    grid = grid.reshape(f, t_source, D)
    if t_target <= t_source:
        start = (t_source - t_target) // 2
        grid = grid[:, start:start + t_target]
    else:
        grid = jax.image.resize(grid, (f, t_target, D), method="linear")
    return jnp.concatenate([special, grid.reshape(f * t_target, D)], axis=0)


# ----------------------------------------------------------------------------- task
@register_task("ast")
class ASTTask(ClassificationTask):
    """Audio classification with AST (configs/ast.py). Data: `data.paths=(root,)`, an ESC-50
    tree (root/meta/esc50.csv) or a folder of WAVs per class, else the embedded synthetic clips
    written once as an ESC-50 tree (models/ast/audio.py). `data.classes` picks a subset of the
    classes (labels follow its order). Examples: {"waveform", "label", "targets", "freq_mask",
    "time_mask", "id"}; the spectrogram is computed in the step (`inputs`)."""

    throughput_unit = "clips"
    BACKBONE_FIELDS = (*ClassificationTask.BACKBONE_FIELDS, "patch_size", "fstride", "tstride",
                       "d_model", "num_layers", "num_heads")
    # data fields the spectrogram depends on: a source run must agree (target_length may differ)
    FRONT_END_FIELDS = ("sample_rate", "num_mel_bins", "norm_mean", "norm_std")
    hf_importers = hf.IMPORTERS  # ASTForAudioClassification (models/ast/hf.py)
    FIELD_RULES = {
        "model.norm_eps": ">= 0",  # 0: layer_norm's default (1e-6); Hugging Face's AST: 1e-12
        "model.pool": POOLS, "model.petl": PETL, "model.adapter_placement": PLACEMENTS,
        "model.adapter_location": LOCATIONS, "model.fstride": ">= 1", "model.tstride": ">= 1",
        "model.adapter_reduction": ">= 1", "model.lora_rank": ">= 1", "model.prompt_length": ">= 1",
        "model.lora_alpha": "> 0",  # the LoRA update's scale alpha / r
        "model.classifier_std": ">= 0",  # 0: a zero-initialised head
        "model.conformer_kernel": ">= 1",
        "data.sample_rate": ">= 1000", "data.clip_seconds": "> 0", "data.num_mel_bins": ">= 1",
        "data.target_length": ">= 1", "data.freqm": ">= 0", "data.timem": ">= 0",  # 0: no masking
        "data.mixup": "[0, 1]",  # a probability; 0: no mixup
        "data.norm_std": "> 0",  # `python -m trainer.audio stats` computes mean and std
        "data.synthetic_per_fold": ">= 1", "data.synthetic_seed": ">= 0",
    }

    # ---- checks
    def check_init_from(self, source_config):
        super().check_init_from(source_config)
        src = source_config.get("data", {})
        diff = [f"config.data.{f}={self.config.data[f]!r}, but the source has {src[f]!r}"
                for f in self.FRONT_END_FIELDS if f in src and src[f] != self.config.data[f]]
        if diff:
            raise ConfigError(f"config.init_from={self.config.init_from!r} saw other "
                              "spectrograms:\n  " + "\n  ".join(diff))

    def validate_data(self):
        d, m = self.config.data, self.config.model
        if d.num_mel_bins < m.patch_size or d.target_length < m.patch_size:
            raise ConfigError(f"config.data.num_mel_bins={d.num_mel_bins} and target_length="
                              f"{d.target_length} must be >= model.patch_size={m.patch_size}")
        if d.freqm > d.num_mel_bins or d.timem > d.target_length:
            raise ConfigError(f"config.data.freqm={d.freqm} must be in [0, num_mel_bins="
                              f"{d.num_mel_bins}] and timem={d.timem} in [0, target_length="
                              f"{d.target_length}]")
        if len(d.paths) > 1:
            raise ConfigError(f"config.data.paths: one audio root, got {tuple(d.paths)}")
        _, _, classes = self.data()
        if m.num_classes != len(classes) and self.match_data:
            raise ConfigError(f"config.model.num_classes={m.num_classes}, but the data has "
                              f"{len(classes)} classes ({', '.join(classes[:10])}"
                              f"{', ...' if len(classes) > 10 else ''}); set "
                              f"--config.model.num_classes={len(classes)}")

    def validate_backbone(self, mesh_sizes):
        m = self.config.model
        if m.probe:
            raise ConfigError(f"config.model.probe={m.probe!r}: the AST family adapts with "
                              f"model.petl (allowed: {', '.join(PETL)})")
        tp = mesh_sizes["tensor"]
        if m.num_heads % tp or m.num_kv_heads % tp or m.num_heads % m.num_kv_heads:
            raise ConfigError(f"config.model.num_heads={m.num_heads} / num_kv_heads="
                              f"{m.num_kv_heads}: heads must be a multiple of kv heads and both "
                              f"divisible by mesh.tensor={tp}")
        if m.conformer_kernel % 2 == 0:
            raise ConfigError(f"config.model.conformer_kernel={m.conformer_kernel} must be odd "
                              "(a centred depthwise convolution)")
        if m.petl != "full" and not self.config.train.trainable:
            raise ConfigError(f"config.model.petl={m.petl!r} trains part of the model, but "
                              f"train.trainable is empty (everything would train); set "
                              f"--config.train.trainable='{PETL_TRAINABLE[m.petl]}'")

    # ---- model
    def build_backbone(self, rngs, dtype):
        d = self.config.data
        return AST(self.config.model, d.target_length, d.num_mel_bins, dtype=dtype, rngs=rngs)

    # another data.target_length changes the inputs: not a growth whose losses compare
    init_from_adaptation = "position embeddings resized to this run's data.target_length"

    def adapt_init_from(self, name, source, target):
        if not name.endswith("backbone/pos_embed"):
            return None
        f, t = patch_grid(self.config.data.target_length, self.config.data.num_mel_bins,
                          self.config.model)
        if (source.shape[0] - AST.NUM_SPECIAL) % f or source.shape[-1] != target.shape[-1]:
            return None  # another frequency grid or width: the trainer reports the mismatch
        return adapt_pos_embed(source, f, t)

    # ---- data
    def clips(self, split: str):
        """The models/ast/audio.py Clips of a split (config.data.paths or the embedded set)."""
        import os

        d = self.config.data
        classes = tuple(d.classes) or None
        kw = dict(sample_rate=d.sample_rate, classes=classes, skip_bad=d.skip_bad)
        if d.paths:
            root = d.paths[0]
            if os.path.exists(os.path.join(root, "meta", "esc50.csv")):
                return audio.esc50(root, split, eval_folds=tuple(d.eval_folds), **kw)
            return audio.wav_folder(root, split, seed=self.config.seed, **kw)
        params = dict(num_per_class_per_fold=d.synthetic_per_fold, seed=d.synthetic_seed,
                      sample_rate=d.sample_rate, seconds=d.clip_seconds)
        root = audio.write_synthetic_esc50(
            embedded_dir("audio_synthetic", params, d.embedded_dir), **params)
        return audio.esc50(root, split, eval_folds=tuple(d.eval_folds), **kw)

    def data(self):
        if self._data is None:
            d = self.config.data
            kw = dict(seed=self.config.seed, num_samples=round(d.sample_rate * d.clip_seconds),
                      num_frames=d.target_length, num_mel_bins=d.num_mel_bins)
            train, evals = self.clips("train"), self.clips("eval")
            self._data = (
                audio.clip_dataset(train, "train", mixup=d.mixup, freqm=d.freqm, timem=d.timem,
                                   **kw),
                audio.clip_dataset(evals, "eval", **kw), list(train.classes))
        return self._data

    def front_end(self, waveform, freq_mask=None, time_mask=None):
        """waveform [B, N] -> normalised log-mel spectrogram [B, target_length, num_mel_bins]."""
        d = self.config.data
        return audio.front_end(waveform, sample_rate=d.sample_rate, num_mel_bins=d.num_mel_bins,
                               target_length=d.target_length, mean=d.norm_mean, std=d.norm_std,
                               freq_mask=freq_mask, time_mask=time_mask)

    def inputs(self, batch):
        fbank = self.front_end(batch["waveform"].astype(jnp.float32), batch.get("freq_mask"),
                               batch.get("time_mask"))
        return fbank.astype(compute_dtype(self.config.train.compute_dtype))

    # ---- evaluation pictures
    def eval_outputs(self, model, batch):
        return {"id": batch["id"], "label": batch["label"],
                "predicted": jnp.argmax(model(self.inputs(batch)), axis=-1)}

    def eval_images(self, outputs, count: int = 4):
        """The first `count` eval spectrograms side by side, named by their true -> predicted
        classes (logged once per eval, so the picture per step stays one image)."""
        ds, classes = self.eval_data(), self.data()[2]
        n = min(count, len(outputs["id"]))
        if not n:
            return {}
        wave = np.stack([np.asarray(ds[int(i)]["waveform"]) for i in outputs["id"][:n]])
        fbank = np.asarray(jax.jit(self.front_end)(jnp.asarray(wave)))
        tiles = [audio.spectrogram_image(f) for f in fbank]
        gap = np.full((tiles[0].shape[0], 4, 3), 255, np.uint8)
        picture = np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=1)
        self.eval_captions = [f"{classes[int(a)]} -> {classes[int(b)]}" for a, b in
                              zip(outputs["label"][:n], outputs["predicted"][:n])]
        return {"spectrograms": picture}

    def describe(self):
        m, d = self.config.model, self.config.data
        src = f"audio {d.paths[0]}" if d.paths else "synthetic clips (ESC-50 layout)"
        return (f"ast: {m.num_classes} classes, {src}, {d.num_mel_bins} mel x "
                f"{d.target_length} frames, petl={m.petl}",)

