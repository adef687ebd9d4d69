"""iFormer, the Inception Transformer (Si et al., NeurIPS 2022; sail-sg/iFormer
models/inception_transformer.py), on the classification Task of models/vit.py.

Inception mixer of a feature map x [B, H, W, C], with C = num_heads * head_dim split by channel:
  C_h = C - C_l channels (the first ones) -> high-frequency mixers, half each:
      conv branch       Y_h1 = GELU(DWConv_3x3(Linear(x_h1)))          [B, H, W, 2 * C_h/2]
      max-pool branch   Y_h2 = GELU(Linear(MaxPool_3x3(x_h2)))        [B, H, W, 2 * C_h/2]
  C_l = attention_heads * head_dim channels (the last) -> low-frequency mixer:
      Y_l = Upsample(MSA(AvgPool(x_l)))                                [B, H, W, C_l]
  Y_c = concat(Y_h1, Y_h2, Y_l);  Y = Linear(Y_c + DWConv_3x3(Y_c)) -> [B, H, W, C]
The MSA comes from the attention registry (`model.attention`, bidirectional), so its output
projection W_o precedes the fusion (the reference has none there; the fusion's linear follows).
Blocks: x + Mixer(LN(x)), x + MLP(LN(x)). Stages: a stem of two 3x3 stride-2 convolutions
(4x smaller), then per stage a 3x3 stride-2 convolution (patch merging; not before the first),
learned positions, `depths[s]` blocks; final LN, mean over positions.

Frequency ramp (iFormer-S: 96/192/320/384 channels of 3/6/10/12 heads with 1, 3, 7 -> 9, 11
attention heads; pool 2, 2, 1, 1): `model.attention_heads` lists each block's C_l / head_dim,
increasing with depth; `model.pool` each stage's pooling. Deviations from the reference, for a
small, stateless model: LayerNorm instead of BatchNorm in the stem and patch merging, no layer
scale, no stochastic depth. Odd feature maps are padded for pooling (edge windows average their
valid pixels only) and cropped after upsampling, so any H x W works.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import attention
from attention.layers import Mlp, layer_norm, linear, param
from attention.sharding import constrain
from models.vit import ClassificationTask, attention_config, token_positions
from trainer.config import ConfigError
from trainer.task import register_task

_ACT = ("batch", None, None, "act_embed")  # activations [B, H, W, C]


# ----------------------------------------------------------------------------- spatial ops
def avg_pool(x, p: int):
    """Average over p x p windows with stride p; x [B, H, W, C] -> [B, ceil(H/p), ceil(W/p), C].
    Windows past the border average only their valid pixels (count_include_pad=False)."""
    if p == 1:
        return x
    B, H, W, C = x.shape
    h, w = -(-H // p), -(-W // p)
    pad = ((0, h * p - H), (0, w * p - W))
    total = jnp.pad(x, ((0, 0), *pad, (0, 0))).reshape(B, h, p, w, p, C).sum((2, 4))
    count = jnp.pad(jnp.ones((H, W), x.dtype), pad).reshape(h, p, w, p).sum((1, 3))
    return total / count[None, :, :, None]


def upsample(x, p: int, H: int, W: int):
    """Nearest-neighbour upsampling by p, cropped to H x W: [B, h, w, C] -> [B, H, W, C]."""
    if p == 1:
        return x
    return jnp.repeat(jnp.repeat(x, p, axis=1), p, axis=2)[:, :H, :W]


def max_pool_3x3(x):
    """3 x 3 max-pool, stride 1, padding 1 (with -inf): x [B, H, W, C] -> the same shape."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1),
                                 ((0, 0), (1, 1), (1, 1), (0, 0)))


def conv(din: int, dout: int, *, stride: int = 1, depthwise: bool = False, bias: bool = True,
         dtype, rngs):
    """3 x 3 convolution, padding 1 (depthwise: one filter per channel); replicated weights."""
    return nnx.Conv(din, dout, (3, 3), strides=stride, padding=((1, 1), (1, 1)),
                    feature_group_count=din if depthwise else 1, use_bias=bias, dtype=dtype,
                    param_dtype=jnp.float32,
                    kernel_init=nnx.initializers.normal(0.02) if depthwise
                    else nnx.initializers.lecun_normal(), rngs=rngs)


# ----------------------------------------------------------------------------- mixers
class LowMixer(nnx.Module):
    """Low-frequency mixer: Upsample(MSA(AvgPool_pool(x))); x [B, H, W, C_l] -> same shape.
    With pool 1 it is the registry's attention over the H W tokens."""

    def __init__(self, cfg, dim: int, heads: int, pool: int, *, dtype, rngs):
        self.pool = pool
        acfg = attention_config(cfg, d_model=dim, num_heads=heads, num_kv_heads=heads,
                                head_dim=dim // heads, num_layers=sum(cfg.depths))
        self.attn = attention.build(cfg.attention, acfg, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        B, H, W, C = x.shape
        xa = avg_pool(x, self.pool)
        h, w = xa.shape[1:3]
        tokens = xa.reshape(B, h * w, C)
        ya, _ = self.attn(tokens, positions=token_positions(B, h * w))
        return upsample(ya.reshape(B, h, w, C), self.pool, H, W)


class HighMixer(nnx.Module):
    """High-frequency mixers on x [B, H, W, C_h] -> [B, H, W, 2 C_h]: the first C_h/2 channels
    through a 1x1 linear then a depthwise 3x3 conv, the other C_h/2 through a 3x3 max-pool then
    a 1x1 linear; each doubles its channels, GELU after each branch (reference order)."""

    def __init__(self, dim: int, *, dtype, rngs):
        half = self.half = dim // 2
        self.conv_in = linear(half, 2 * half, (None, None), dtype=dtype, rngs=rngs, std=None,
                              bias=False)
        self.conv_dw = conv(2 * half, 2 * half, depthwise=True, bias=False, dtype=dtype,
                            rngs=rngs)
        self.pool_proj = linear(half, 2 * half, (None, None), dtype=dtype, rngs=rngs, std=None)

    def __call__(self, x):
        cx = jax.nn.gelu(self.conv_dw(self.conv_in(x[..., :self.half])), approximate=False)
        px = jax.nn.gelu(self.pool_proj(max_pool_3x3(x[..., self.half:])), approximate=False)
        return jnp.concatenate([cx, px], axis=-1)


class InceptionMixer(nnx.Module):
    """The iFormer token mixer; x [B, H, W, C] -> [B, H, W, C] (equations in the module doc)."""

    def __init__(self, cfg, dim: int, heads: int, attention_heads: int, pool: int, *, dtype,
                 rngs):
        head_dim = dim // heads
        self.low_dim = attention_heads * head_dim
        self.high_dim = dim - self.low_dim
        self.high = HighMixer(self.high_dim, dtype=dtype, rngs=rngs) if self.high_dim else None
        self.low = LowMixer(cfg, self.low_dim, attention_heads, pool, dtype=dtype, rngs=rngs) \
            if self.low_dim else None
        mixed = 2 * self.high_dim + self.low_dim
        self.fuse = conv(mixed, mixed, depthwise=True, bias=False, dtype=dtype, rngs=rngs)
        self.proj = linear(mixed, dim, (None, "embed"), dtype=dtype, rngs=rngs, std=None)

    def __call__(self, x):
        parts = []
        if self.high is not None:
            parts.append(self.high(x[..., :self.high_dim]))
        if self.low is not None:
            parts.append(self.low(x[..., self.high_dim:]))
        y = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
        return self.proj(y + self.fuse(y))


class Block(nnx.Module):
    """x + Mixer(LN(x)), then x + MLP(LN(x)); x [B, H, W, C]."""

    def __init__(self, cfg, dim: int, heads: int, attention_heads: int, pool: int, *, dtype,
                 rngs):
        self.mixer_norm = layer_norm(dim, dtype=dtype, rngs=rngs)
        self.mixer = InceptionMixer(cfg, dim, heads, attention_heads, pool, dtype=dtype,
                                    rngs=rngs)
        self.mlp_norm = layer_norm(dim, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = constrain(x + self.mixer(self.mixer_norm(x)), _ACT)
        return constrain(x + self.mlp(self.mlp_norm(x)), _ACT)


class Downsample(nnx.Module):
    """3 x 3 stride-2 convolution then LN: [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C']."""

    def __init__(self, din: int, dout: int, *, dtype, rngs):
        self.conv = conv(din, dout, stride=2, dtype=dtype, rngs=rngs)
        self.norm = layer_norm(dout, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.conv(x))


def grid_sizes(image_size: int, stages: int) -> list[int]:
    """The feature map's side in each stage: the stem divides by 4, each merge by 2 (ceil)."""
    s = -(-(-(-image_size // 2)) // 2)
    sizes = [s]
    for _ in range(stages - 1):
        sizes.append(-(-sizes[-1] // 2))
    return sizes


class IFormer(nnx.Module):
    """cfg: config.model (dims, depths, num_heads, attention_heads, pool, mlp_ratio, attention,
    rope_theta, causal). images [B, S, S, 3] -> (tokens [B, h w, C_last] after the final LN,
    their mean [B, C_last])."""

    def __init__(self, cfg, image_size: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        dims = list(cfg.dims)
        self.dim = dims[-1]
        sizes = grid_sizes(image_size, len(dims))
        with nnx.use_eager_sharding(False):
            self.stem_conv1 = conv(3, dims[0] // 2, stride=2, dtype=dtype, rngs=rngs)
            self.stem_norm1 = layer_norm(dims[0] // 2, dtype=dtype, rngs=rngs)
            self.stem = Downsample(dims[0] // 2, dims[0], dtype=dtype, rngs=rngs)
            self.merges = nnx.List([Downsample(dims[s - 1], dims[s], dtype=dtype, rngs=rngs)
                                    for s in range(1, len(dims))])
            self.pos_embeds = nnx.List([
                param(rngs, nnx.initializers.normal(0.02), (n, n, d), (None, None, "embed"))
                for n, d in zip(sizes, dims)])
            heads = iter(cfg.attention_heads)
            self.stages = nnx.List([
                nnx.List([Block(cfg, d, cfg.num_heads[s], next(heads), cfg.pool[s], dtype=dtype,
                                rngs=rngs) for _ in range(cfg.depths[s])])
                for s, d in enumerate(dims)])
            self.final_norm = layer_norm(self.dim, dtype=dtype, rngs=rngs)

    def __call__(self, images):
        x = jax.nn.gelu(self.stem_norm1(self.stem_conv1(images)), approximate=False)
        x = self.stem(x)
        for s, blocks in enumerate(self.stages):
            if s:
                x = self.merges[s - 1](x)
            x = constrain(x + self.pos_embeds[s][...].astype(x.dtype), _ACT)
            for block in blocks:
                x = block(x)
        B, H, W, C = x.shape
        x = self.final_norm(x.reshape(B, H * W, C))
        return x, x.mean(axis=1)


@register_task("iformer")
class IFormerTask(ClassificationTask):
    """iFormer image classification (configs/iformer.py)."""

    BACKBONE_FIELDS = (*ClassificationTask.BACKBONE_FIELDS, "pool")
    # per stage (dims, depths, num_heads, pool) and per block (attention_heads: 0 = a
    # convolution-only mixer)
    FIELD_RULES = {"model.dims": ">= 1", "model.depths": ">= 1", "model.pool": ">= 1",
                   "model.attention_heads": ">= 0", "model.mlp_ratio": "> 0"}

    def feature_dim(self):
        return self.config.model.dims[-1]

    def validate_backbone(self, mesh_sizes):
        m = self.config.model
        n = len(m.dims)
        for field in ("depths", "num_heads", "pool"):
            if len(m[field]) != n:
                raise ConfigError(f"config.model.{field}={tuple(m[field])} needs one entry per "
                                  f"stage: {n} (config.model.dims={tuple(m.dims)})")
        if len(m.attention_heads) != sum(m.depths):
            raise ConfigError(f"config.model.attention_heads={tuple(m.attention_heads)} needs one "
                              f"entry per block: sum(depths)={sum(m.depths)}")
        if m.dims[0] % 2:
            raise ConfigError(f"config.model.dims[0]={m.dims[0]} must be even (the stem's first "
                              "convolution has half its channels)")
        blocks = [(s, d, h) for s, (d, h, k) in enumerate(zip(m.dims, m.num_heads, m.depths))
                  for _ in range(k)]
        for (s, d, h), a in zip(blocks, m.attention_heads):
            if d % h:
                raise ConfigError(f"config.model.dims[{s}]={d} is not divisible by "
                                  f"num_heads[{s}]={h}")
            if not 0 <= a <= h:
                raise ConfigError(f"config.model.attention_heads: {a} in stage {s} must be in "
                                  f"[0, num_heads[{s}]={h}]")
            if ((h - a) * (d // h)) % 2:
                raise ConfigError(f"config.model.attention_heads: {a} of {h} heads in stage {s} "
                                  f"leaves an odd number of high-frequency channels "
                                  f"({(h - a) * (d // h)}), which the two branches split in half")

    def build_backbone(self, rngs, dtype):
        return IFormer(self.config.model, self.config.data.image_size, dtype=dtype, rngs=rngs)
