"""BoxRPB: box-to-pixel relative position bias, and the global cross-attention that uses it.

Plain DETR (Lin et al., ICCV 2023, "DETR Doesn't Need Multi-Scale or Locality Design", sec. 3.2;
impiga/Plain-DETR models/global_rpe_decomp_decoder.py). Each decoder query carries a reference
box; its attention to a pixel of the single-scale feature map is biased by how far the pixel
centre lies from the box's corners, through two small MLPs, one per axis:

    B(q, (i, j)) = MLP_x([x1_q - px_j, x2_q - px_j]) + MLP_y([y1_q - py_i, y2_q - py_i])
    attention = softmax(Q K^T / sqrt(d_h) + B) V

Decomposing B into an x and a y term keeps its inputs O(Q (H + W)) instead of O(Q H W); the
[B, heads, Q, H*W] bias exists only as the broadcast sum that is added to the logits.

Boxes are normalised (cx, cy, w, h) relative to the padded S x S canvas, so the canvas in pixels
is (W * stride, H * stride) and no valid-ratio rescaling is needed (the reference rescales by
valid ratios because its boxes are relative to the unpadded image).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from attention.layers import linear

ENCODINGS = ("linear", "abs_log8")
# added to the logits of padded memory tokens: exp(-1e9 - max) is exactly 0 in float32, and a
# row whose keys are all padded still gets a finite (uniform) softmax rather than NaN
MASK_VALUE = -1e9


def box_rpb_offsets(ref_boxes, feat_hw, stride, *, encoding: str = "linear"):
    """Corner-to-pixel-centre offsets, per axis, in pixels (or their abs_log8 encoding).

    ref_boxes [B, Q, 4] normalised cxcywh; feat_hw = (H, W) of the feature map; stride = pixels
    per feature cell. Returns dx [B, Q, W, 2] (x1 - px_j, x2 - px_j) and dy [B, Q, H, 2]
    (y1 - py_i, y2 - py_i), float32.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    H, W = feat_hw
    boxes = ref_boxes.astype(jnp.float32)
    cx, cy, w, h = (boxes[..., i] for i in range(4))
    # corners in canvas pixels: the canvas is the feature map times the stride
    x = jnp.stack([cx - w / 2, cx + w / 2], -1) * (W * stride)  # [B, Q, 2]
    y = jnp.stack([cy - h / 2, cy + h / 2], -1) * (H * stride)
    # pixel centres px_j = (j + 0.5) * stride
    px = (jnp.arange(W, dtype=jnp.float32) + 0.5) * stride
    py = (jnp.arange(H, dtype=jnp.float32) + 0.5) * stride
    dx = x[..., None, :] - px[:, None]  # [B, Q, W, 2]
    dy = y[..., None, :] - py[:, None]  # [B, Q, H, 2]
    if encoding == "abs_log8":
        # d -> sign(d) log2(|d| + 1) / log2(8): compresses far offsets, keeps the sign
        dx, dy = (jnp.sign(d) * jnp.log2(jnp.abs(d) + 1.0) / math.log2(8.0) for d in (dx, dy))
    return dx, dy


class CoordMLP(nnx.Module):
    """Linear(2, hidden) + ReLU + Linear(hidden, heads, no bias): [..., 2] -> [..., heads]."""

    def __init__(self, hidden: int, num_heads: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.fc1 = nnx.Linear(2, hidden, param_dtype=jnp.float32,
                              kernel_init=nnx.with_partitioning(init, (None, "mlp")),
                              bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(),
                                                              ("mlp",)),
                              rngs=rngs)
        # heads is a handful (8): sharding "mlp" alone, since "heads" maps to the same mesh axis
        self.fc2 = nnx.Linear(hidden, num_heads, use_bias=False, param_dtype=jnp.float32,
                              kernel_init=nnx.with_partitioning(init, ("mlp", None)), rngs=rngs)

    def __call__(self, d):
        return self.fc2(jax.nn.relu(self.fc1(d)))


class BoxRPB(nnx.Module):
    """ref_boxes [B, Q, 4] (normalised cxcywh) -> bias [B, heads, Q, H*W] (row-major over
    (H, W), matching a flattened feature map). Computed in float32: the linear offsets are
    hundreds of pixels, beyond bfloat16's resolution of one pixel."""

    def __init__(self, num_heads: int, *, hidden: int = 512, encoding: str = "linear",
                 rngs: nnx.Rngs):
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        self.num_heads = num_heads
        self.encoding = encoding
        # logical names only: the trainer's rules place the parameters on a mesh, and the
        # module also builds outside one (tests, notebooks)
        with nnx.use_eager_sharding(False):
            self.mlp_x = CoordMLP(hidden, num_heads, rngs=rngs)
            self.mlp_y = CoordMLP(hidden, num_heads, rngs=rngs)

    def __call__(self, ref_boxes, feat_hw, stride):
        H, W = feat_hw
        B, Q = ref_boxes.shape[:2]
        dx, dy = box_rpb_offsets(ref_boxes, feat_hw, stride, encoding=self.encoding)
        bias_x = self.mlp_x(dx)  # [B, Q, W, heads]
        bias_y = self.mlp_y(dy)  # [B, Q, H, heads]
        # B(q, (i, j)) = MLP_x(dx)[q, j] + MLP_y(dy)[q, i]
        bias = bias_x[:, :, None, :, :] + bias_y[:, :, :, None, :]  # [B, Q, H, W, heads]
        return bias.reshape(B, Q, H * W, self.num_heads).transpose(0, 3, 1, 2)


class GlobalCrossAttention(nnx.Module):
    """Decoder queries attend to every token of a single-scale feature map (global, no
    deformable sampling), biased by BoxRPB; rpb=False is plain cross-attention (the paper's
    "without BoxRPB" baseline).

    queries [B, Q, D], memory [B, H*W, D] (row-major feature map), ref_boxes [B, Q, 4]
    normalised cxcywh, memory_mask [B, H*W] bool (True = valid pixel) or None, memory_pos
    [B or 1, H*W, D] or None -> [B, Q, D]. Keys come from memory + memory_pos and values from
    memory alone (DETR puts positions on keys, not values); add the queries' positional
    embedding to `queries` before the call.
    """

    def __init__(self, d_model: int, num_heads: int, *, rpb: bool = True, rpb_hidden: int = 512,
                 rpb_encoding: str = "linear", dtype=jnp.float32, rngs: nnx.Rngs):
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} must be a multiple of num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        with nnx.use_eager_sharding(False):  # logical names only, as in BoxRPB
            self.q_proj = linear(d_model, d_model, ("embed", "heads"), dtype=dtype, rngs=rngs)
            self.k_proj = linear(d_model, d_model, ("embed", "heads"), dtype=dtype, rngs=rngs)
            self.v_proj = linear(d_model, d_model, ("embed", "heads"), dtype=dtype, rngs=rngs)
            self.o_proj = linear(d_model, d_model, ("heads", "embed"), dtype=dtype, rngs=rngs)
        self.rpb = (BoxRPB(num_heads, hidden=rpb_hidden, encoding=rpb_encoding, rngs=rngs)
                    if rpb else None)

    def __call__(self, queries, memory, *, ref_boxes=None, feat_hw=None, stride=None,
                 memory_mask=None, memory_pos=None):
        B, Q, D = queries.shape
        N = memory.shape[1]
        heads, hd = self.num_heads, self.head_dim
        q = self.q_proj(queries).reshape(B, Q, heads, hd)
        keys = memory if memory_pos is None else memory + memory_pos
        k = self.k_proj(keys).reshape(B, N, heads, hd)
        v = self.v_proj(memory).reshape(B, N, heads, hd)
        # logits in float32 whatever the compute dtype: the bias and the mask live there
        # Q K^T / sqrt(d_h)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                            preferred_element_type=jnp.float32) / math.sqrt(hd)
        if self.rpb is not None:
            if ref_boxes is None or feat_hw is None or stride is None:
                raise ValueError("BoxRPB needs ref_boxes, feat_hw and stride")
            if feat_hw[0] * feat_hw[1] != N:
                raise ValueError(f"feat_hw={tuple(feat_hw)} does not match {N} memory tokens")
            # + B_rpb
            logits = logits + self.rpb(ref_boxes, feat_hw, stride)
        if memory_mask is not None:
            logits = jnp.where(memory_mask[:, None, None, :], logits, MASK_VALUE)
        # softmax(...) V
        weights = jax.nn.softmax(logits, axis=-1)
        y = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
        return self.o_proj(y.reshape(B, Q, heads * hd))
