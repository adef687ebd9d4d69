"""STDHA: spatial-temporal dual-headed attention (ZeroI2V, Li et al., ECCV 2024).

An image transformer runs over the frames of a clip, each frame's tokens one sequence: the
layer sees x [B * F, N, D], clips frame-major (frame t of clip b is row b * F + t). STDHA makes
it temporal at zero parameter cost: after the q / k / v projections, the keys and values of a
fixed subset of heads are taken from a neighbouring frame,
    K'_t^h = K_{t + o_h}^h,  V'_t^h = V_{t + o_h}^h   (o_h the head's offset; 0: its own frame)
queries stay unshifted, and a frame whose neighbour t + o_h lies outside the clip keeps its own
keys / values (PAPERS.md). Each head then attends within its frame as the image model does, so
with no shift (or F = 1) the layer is exactly SoftmaxAttention applied frame by frame, and an
image checkpoint loads unchanged (the same q / k / v / o parameters).

Config (config.model): num_frames F, the clip length, is the family's (as causal is): a video
family builds its layers with it (models/video.py, from data.num_frames); absent or 1: images.
The option stdha_shift: a tuple of "head:offset" strings, head a key/value head index (with GQA a kv head
shifts for every query head that reads it), offset a frame offset (ZeroI2V: one head from t - 1,
another from t + 1; optionally t - 2). Default ("1:-1", "2:1").
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from attention.registry import read_options, register
from attention.softmax import SoftmaxAttention


def parse_shifts(shifts, num_kv_heads: int) -> dict[int, int]:
    """("1:-1", "2:1") -> {1: -1, 2: 1}; a malformed entry or a head out of range is a
    ValueError naming the field and what is allowed."""
    out = {}
    for item in shifts:
        head, sep, offset = str(item).partition(":")
        try:
            h, o = int(head), int(offset)
        except ValueError:
            h = o = None
        if not sep or h is None:
            raise ValueError(f"config.model.stdha_shift: {item!r} is not 'head:offset' "
                             f"(e.g. '1:-1': key/value head 1 from the previous frame)")
        if not 0 <= h < num_kv_heads:
            raise ValueError(f"config.model.stdha_shift: head {h} in {item!r} is not a key/value "
                             f"head of this layer (0 .. {num_kv_heads - 1})")
        if h in out:
            raise ValueError(f"config.model.stdha_shift: head {h} is shifted twice")
        out[h] = o
    return out


def temporal_shift(x, frames: int, shifts: dict[int, int]):
    """x [B * F, N, H, d] (clips frame-major) -> the same with head h of frame t taken from
    frame t + shifts[h], where that frame exists in the clip (else frame t's own)."""
    if frames == 1 or not any(shifts.values()):
        return x
    bf, n, h, d = x.shape
    if bf % frames:
        raise ValueError(f"stdha: {bf} sequences are not whole clips of num_frames={frames}")
    clips = x.reshape(bf // frames, frames, n, h, d)
    t = jnp.arange(frames)
    heads = []
    for head in range(h):
        src = t + shifts.get(head, 0)
        src = jnp.where((src >= 0) & (src < frames), src, t)  # boundary frames keep their own
        heads.append(jnp.take(clips[:, :, :, head], src, axis=1))   # [B, F, N, d]
    return jnp.stack(heads, axis=3).reshape(bf, n, h, d)


@register("stdha")
class STDHAAttention(SoftmaxAttention):
    """SoftmaxAttention over each frame, with some heads' keys / values from a neighbouring
    frame (module docstring). x [B * F, N, D] -> [B * F, N, D]; no new parameters."""

    OPTION_PREFIX = "stdha"
    CONFIG_DEFAULTS = dict(stdha_shift=("1:-1", "2:1"))
    BIDIRECTIONAL = True

    @staticmethod
    def validate_options(opt, cfg):
        parse_shifts(opt["stdha_shift"], getattr(cfg, "num_kv_heads", None) or cfg.num_heads)

    def __init__(self, cfg, *, dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        opt = read_options(type(self), cfg)
        # the clip length is the family's structure, not an option (absent: images)
        self.frames = int(getattr(cfg, "num_frames", 1) or 1)
        if self.frames < 1:
            raise ValueError(f"stdha: model num_frames={self.frames} must be >= 1")
        # (head, offset) pairs: hashable, static under jit
        self.shifts = tuple(sorted(parse_shifts(opt["stdha_shift"], self.num_kv_heads).items()))

    def attend(self, q, k, v, *, mode: str):
        # K'_t^h = K_{t+o_h}^h, V'_t^h = V_{t+o_h}^h (ZeroI2V's STDHA); queries unshifted
        shifts = dict(self.shifts)
        k = temporal_shift(k, self.frames, shifts)
        v = temporal_shift(v, self.frames, shifts)
        return super().attend(q, k, v, mode=mode)
