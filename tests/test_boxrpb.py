"""BoxRPB (Plain DETR): the bias against a per-pixel loop, its separability and its invariance to
shifting boxes and pixel grid together; GlobalCrossAttention against attention written by hand
(with and without BoxRPB, with padded memory), logical axis names, and gradients reaching the
bias MLPs."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention.boxrpb import ENCODINGS, BoxRPB, GlobalCrossAttention
from attention.sharding import LOGICAL_RULES

H, W, STRIDE, HEADS = 3, 5, 16, 2  # H != W catches a swapped axis


def np_mlp(mlp, d):
    """Linear(2, hidden) + ReLU + Linear(hidden, heads, no bias) in float64 numpy."""
    w1, b1 = (np.asarray(t[...], np.float64) for t in (mlp.fc1.kernel, mlp.fc1.bias))
    w2 = np.asarray(mlp.fc2.kernel[...], np.float64)
    return np.maximum(np.asarray(d, np.float64) @ w1 + b1, 0.0) @ w2


def np_encode(d, encoding):
    return d if encoding == "linear" else np.sign(d) * np.log2(np.abs(d) + 1) / np.log2(8)


def box_rpb_reference(rpb, ref_boxes, feat_hw, stride, encoding):
    """The bias one pixel at a time: B[b, :, q, i W + j] = MLP_x([x1 - px_j, x2 - px_j]) +
    MLP_y([y1 - py_i, y2 - py_i]), corners and pixel centres in canvas pixels."""
    h, w = feat_hw
    boxes = np.asarray(ref_boxes, np.float64)
    nb, nq = boxes.shape[:2]
    out = np.zeros((nb, rpb.num_heads, nq, h * w))
    for b in range(nb):
        for q in range(nq):
            cx, cy, bw, bh = boxes[b, q]
            x1, x2 = (cx - bw / 2) * w * stride, (cx + bw / 2) * w * stride
            y1, y2 = (cy - bh / 2) * h * stride, (cy + bh / 2) * h * stride
            for i in range(h):
                for j in range(w):
                    px, py = (j + 0.5) * stride, (i + 0.5) * stride
                    dx = np_encode(np.array([x1 - px, x2 - px]), encoding)
                    dy = np_encode(np.array([y1 - py, y2 - py]), encoding)
                    out[b, :, q, i * w + j] = np_mlp(rpb.mlp_x, dx) + np_mlp(rpb.mlp_y, dy)
    return out


def random_boxes(key, shape):
    """Normalised cxcywh boxes, some reaching past the canvas edge (the bias must not care)."""
    k1, k2 = jax.random.split(key)
    centre = jax.random.uniform(k1, shape + (2,), minval=0.05, maxval=0.95)
    size = jax.random.uniform(k2, shape + (2,), minval=0.05, maxval=0.8)
    return jnp.concatenate([centre, size], -1)


def rpb_layer(encoding, seed=0):
    return BoxRPB(HEADS, hidden=16, encoding=encoding, rngs=nnx.Rngs(seed))


BOXES = random_boxes(jax.random.key(1), (2, 4))


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_box_rpb_equals_per_pixel_loop(encoding):
    rpb = rpb_layer(encoding)
    bias = rpb(BOXES, (H, W), STRIDE)
    assert bias.shape == (2, HEADS, 4, H * W)
    want = box_rpb_reference(rpb, BOXES, (H, W), STRIDE, encoding)
    np.testing.assert_allclose(bias, want, rtol=1e-4, atol=1e-4)


def test_box_rpb_is_separable():
    # bias[b, h, q, (i, j)] = f_x(q, j) + f_y(q, i)  <=>  every 2x2 mixed difference is 0
    bias = np.asarray(rpb_layer("linear")(BOXES, (H, W), STRIDE), np.float64)
    grid = bias.reshape(bias.shape[:3] + (H, W))
    mixed = grid - grid[..., :1, :] - grid[..., :, :1] + grid[..., :1, :1]
    assert np.abs(grid).max() > 1e-2  # not trivially separable by being 0
    np.testing.assert_allclose(mixed, 0.0, atol=1e-4)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_shifting_boxes_and_grid_together_leaves_bias_unchanged(encoding):
    # moving a box by (s, t) whole strides moves its bias map by (s, t) pixels: the bias depends
    # only on box-corner-to-pixel-centre offsets, not on absolute positions
    s, t = 2, 1
    rpb = rpb_layer(encoding)
    shifted = BOXES.at[..., 0].add(s / W).at[..., 1].add(t / H)
    grid = rpb(BOXES, (H, W), STRIDE).reshape(2, HEADS, 4, H, W)
    grid_shifted = rpb(shifted, (H, W), STRIDE).reshape(2, HEADS, 4, H, W)
    np.testing.assert_allclose(grid_shifted[..., t:, s:], grid[..., :H - t, :W - s],
                               rtol=1e-5, atol=1e-4)
    # and it is a real constraint: without the matching grid shift the maps differ
    assert np.abs(grid_shifted[..., t:, s:] - grid[..., t:, s:]).max() > 1e-3


def np_attention(queries, memory, layer, bias=None, valid=None, pos=None):
    """softmax(Q K^T / sqrt(d_h) + B) V per head in float64, keys from memory + pos, values
    from memory, masked keys dropped entirely; projections read from the layer's parameters."""
    def lin(x, p):
        return np.asarray(x, np.float64) @ np.asarray(p.kernel[...], np.float64) + \
            np.asarray(p.bias[...], np.float64)
    nb, nq, d = queries.shape
    heads, hd = layer.num_heads, layer.head_dim
    q = lin(queries, layer.q_proj).reshape(nb, nq, heads, hd)
    k = lin(memory if pos is None else memory + pos, layer.k_proj).reshape(nb, -1, heads, hd)
    v = lin(memory, layer.v_proj).reshape(nb, -1, heads, hd)
    y = np.zeros((nb, nq, heads, hd))
    for b in range(nb):
        keep = np.ones(k.shape[1], bool) if valid is None else np.asarray(valid[b])
        for h in range(heads):
            logits = q[b, :, h] @ k[b, keep, h].T / math.sqrt(hd)
            if bias is not None:
                logits = logits + np.asarray(bias, np.float64)[b, h][:, keep]
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            y[b, :, h] = p @ v[b, keep, h]
    return lin(y.reshape(nb, nq, heads * hd), layer.o_proj)


D = 16
KEYS = jax.random.split(jax.random.key(2), 3)
QUERIES = jax.random.normal(KEYS[0], (2, 4, D))
MEMORY = jax.random.normal(KEYS[1], (2, H * W, D))
# image 1 is padded at the bottom and right (the canvas convention): its last row and column
_ROW, _COL = jnp.arange(H * W) // W, jnp.arange(H * W) % W
VALID = jnp.stack([jnp.ones(H * W, bool), (_ROW < H - 1) & (_COL < W - 1)])


def attention_layer(rpb, seed=0):
    layer = GlobalCrossAttention(D, HEADS, rpb=rpb, rpb_hidden=16, rngs=nnx.Rngs(seed))
    # non-zero biases, so the test sees them used
    for p in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj):
        p.bias[...] = jax.random.normal(jax.random.key(seed + 9), p.bias.shape) * 0.1
    return layer


def test_cross_attention_without_rpb_equals_softmax_attention():
    layer = attention_layer(rpb=False)
    assert layer.rpb is None
    got = layer(QUERIES, MEMORY)
    np.testing.assert_allclose(got, np_attention(QUERIES, MEMORY, layer), rtol=1e-4, atol=1e-5)


def test_cross_attention_with_rpb_adds_the_bias_and_ignores_padded_memory():
    layer = attention_layer(rpb=True)
    pos = jax.random.normal(KEYS[2], (1, H * W, D))
    got = layer(QUERIES, MEMORY, ref_boxes=BOXES, feat_hw=(H, W), stride=STRIDE,
                memory_mask=VALID, memory_pos=pos)
    bias = box_rpb_reference(layer.rpb, BOXES, (H, W), STRIDE, "linear")
    np.testing.assert_allclose(got, np_attention(QUERIES, MEMORY, layer, bias, VALID, pos),
                               rtol=1e-4, atol=1e-5)
    # padded tokens get ~zero weight: changing them changes nothing
    noise = jax.random.normal(jax.random.key(3), MEMORY.shape) * 10
    changed = jnp.where(VALID[..., None], MEMORY, noise)
    again = layer(QUERIES, changed, ref_boxes=BOXES, feat_hw=(H, W), stride=STRIDE,
                  memory_mask=VALID, memory_pos=pos)
    np.testing.assert_allclose(again, got, rtol=1e-6, atol=1e-6)
    unmasked = layer(QUERIES, changed, ref_boxes=BOXES, feat_hw=(H, W), stride=STRIDE,
                     memory_pos=pos)
    assert np.abs(np.asarray(unmasked) - np.asarray(got)).max() > 1e-3


def test_parameters_carry_logical_axis_names_and_get_gradients():
    layer = attention_layer(rpb=True)
    names = {}
    for path, var in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
        names["/".join(map(str, path))] = var.get_metadata()["out_sharding"]
    assert names["q_proj/kernel"] == ("embed", "heads")
    assert names["o_proj/kernel"] == ("heads", "embed")
    assert names["rpb/mlp_x/fc1/kernel"] == (None, "mlp")
    for logical in names.values():
        assert logical is not None and all(n is None or n in LOGICAL_RULES for n in logical)

    def loss(model):
        y = model(QUERIES, MEMORY, ref_boxes=BOXES, feat_hw=(H, W), stride=STRIDE)
        return (y ** 2).sum()

    grads = nnx.grad(loss)(layer)
    for mlp in ("mlp_x", "mlp_y"):
        for fc in ("fc1", "fc2"):
            assert np.abs(np.asarray(grads["rpb"][mlp][fc]["kernel"][...])).max() > 0
