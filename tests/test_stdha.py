"""STDHA (ZeroI2V's spatial-temporal dual-headed attention) against plain numpy: with no shift it
is softmax attention frame by frame (an image model's), a shifted head of frame t attends to
frame t + o's keys and values (its own at the clip's boundary), and the order of the frames then
matters; bad shift specs name the field."""
from __future__ import annotations

import types

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention

B, F, N, D, H = 2, 3, 5, 32, 4
HD = D // H


def _cfg(**kw):
    base = dict(d_model=D, num_heads=H, num_kv_heads=H, head_dim=0, num_layers=1, rope_theta=0.0,
                causal=False, attention="stdha")
    base.update(kw)
    return types.SimpleNamespace(**base)


def _build(name="stdha", **kw):
    with nnx.use_eager_sharding(False):
        return attention.build(name, _cfg(**kw), dtype=jnp.float32, rngs=nnx.Rngs(0))


def _x(seed=0):
    x = np.random.default_rng(seed).standard_normal((B * F, N, D))
    return jnp.asarray(x, jnp.float32), jnp.broadcast_to(jnp.arange(N), (B * F, N))


def _reference(layer, x, shifts):
    """numpy: per clip, frame and head, softmax(q_t k_s^T / sqrt d) v_s with s = t + o_h inside
    the clip (else t), then o_proj."""
    x = np.asarray(x, np.float64)
    w = {n: np.asarray(getattr(layer, n).kernel[...], np.float64)
         for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    q, k, v = ((x @ w[n]).reshape(B, F, N, H, HD) for n in ("q_proj", "k_proj", "v_proj"))
    y = np.zeros((B, F, N, H, HD))
    for t in range(F):
        for h in range(H):
            s = t + shifts.get(h, 0)
            s = s if 0 <= s < F else t
            a = np.einsum("bid,bjd->bij", q[:, t, :, h], k[:, s, :, h]) / np.sqrt(HD)
            a = np.exp(a - a.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            y[:, t, :, h] = np.einsum("bij,bjd->bid", a, v[:, s, :, h])
    return y.reshape(B * F, N, D) @ w["o_proj"]


def test_no_shift_is_the_image_model_frame_by_frame():
    x, pos = _x()
    softmax = _build("softmax")
    for kw in (dict(num_frames=F, stdha_shift=()), dict(num_frames=1)):
        y, _ = _build(**kw)(x, positions=pos)
        np.testing.assert_allclose(np.asarray(y), np.asarray(softmax(x, positions=pos)[0]),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shift", [("1:-1", "2:1"), ("0:-2", "3:1")])
def test_shifted_heads_read_the_neighbouring_frame(shift):
    layer = _build(num_frames=F, stdha_shift=shift)
    x, pos = _x(1)
    y, _ = layer(x, positions=pos)
    shifts = {int(a): int(b) for a, b in (s.split(":") for s in shift)}
    np.testing.assert_allclose(np.asarray(y), _reference(layer, x, shifts), rtol=1e-4, atol=1e-5)
    assert set(attention.get("stdha").CONFIG_DEFAULTS) == {"stdha_shift"}  # no parameters of its own:
    assert set(nnx.state(layer, nnx.Param)) == set(nnx.state(_build("softmax"), nnx.Param))


def test_frame_order_matters_only_with_a_shift():
    x, pos = _x(2)
    order = np.array([2, 0, 1])
    perm = (np.arange(B)[:, None] * F + order[None]).reshape(-1)  # frames reordered in each clip
    for shift, equivariant in (((), True), (("1:-1", "2:1"), False)):
        layer = _build(num_frames=F, stdha_shift=shift)
        y = np.asarray(layer(x, positions=pos)[0])
        y_perm = np.asarray(layer(x[perm], positions=pos)[0])
        assert np.allclose(y_perm, y[perm], atol=1e-5) == equivariant


@pytest.mark.parametrize("shift,match", [(("1",), "not 'head:offset'"),
                                         (("4:1",), r"head 4 .*\(0 .. 3\)"),
                                         (("1:1", "1:-1"), "shifted twice")])
def test_bad_shift_specs_name_the_field(shift, match):
    with pytest.raises(ValueError, match=f"stdha_shift.*{match}"):
        _build(num_frames=F, stdha_shift=shift)
    with pytest.raises(ValueError, match="num_frames"):
        _build(num_frames=-1)
