"""attention.inspect, the public API for looking inside a layer (what the attention zoo
notebook uses): the config of one layer, the weights its heads apply (softmax against numpy,
Landmark against its grouped softmax's own weights), each mechanism's own structures (block
masks, clusters, retrieved blocks) against the weights, batches against their rows, and the
inspected layer left unchanged."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention

T, D, H = 64, 32, 2


def _layer(name, **options):
    cfg = attention.layer_config(name, d_model=D, num_heads=H, **options)
    with nnx.use_eager_sharding(False):
        return attention.build(name, cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))


def _x(seed=0, batch=1):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((batch, T, D)), jnp.float32),
            jnp.broadcast_to(jnp.arange(T), (batch, T)))


def test_layer_config_defaults_and_bad_options():
    c = attention.layer_config("hip", d_model=D, num_heads=H, hip_mask_k=32)
    assert c.hip_mask_k == 32 and c.hip_window == 256 and c.num_kv_heads == H
    with pytest.raises(ValueError, match="no option hip_mask.*hip has .*hip_mask_k"):
        attention.layer_config("hip", d_model=D, num_heads=H, hip_mask=3)


def test_softmax_weights_are_the_causal_softmax():
    layer = _layer("softmax")
    x, pos = _x()
    w = attention.explain(layer, x, pos, mode="train")["weights"]                # [1, H, T, T]
    q, k = (np.asarray(a, np.float64) for a in attention.queries_and_keys(layer, x, pos))
    s = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(D // H)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    ref = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(w, ref / ref.sum(-1, keepdims=True), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,options", [
    ("hip", dict(hip_mask_k=16, hip_block_q=16, hip_block_k=16, hip_window=16, hip_sink=0)),
    ("dhsa", dict(dhsa_block_q=16, dhsa_block_k=16, dhsa_chunk_size=8, dhsa_topk=16,
                  dhsa_window=16, dhsa_sink=0)),
    ("flexprefill", dict(flex_block=16, flex_gamma=0.5, flex_min_budget=16)),
])
def test_block_sparse_weights_stay_inside_the_block_mask(name, options):
    layer = _layer(name, **options)
    x, pos = _x(1)
    seen = attention.explain(layer, x, pos)
    mask, w = seen["block_mask"], seen["weights"]
    assert mask.dtype == bool and mask.shape[-2:] == (T // 16, T // 16)
    tokens = np.repeat(np.repeat(np.broadcast_to(mask, (1, H, 4, 4)), 16, -2), 16, -1)
    assert np.all(w[~tokens] == 0.0) and np.all(w[:, :, np.triu_indices(T, 1)[0],
                                                    np.triu_indices(T, 1)[1]] == 0.0)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    assert 0 < mask.mean() < 1  # sparse: some blocks dropped
    if name == "flexprefill":
        assert seen["query_aware"].shape == (1, H) and seen["query_aware"].dtype == bool


def test_routing_clusters_hold_their_tokens():
    layer = _layer("routing", routing_num_clusters=4, routing_local_window=16)
    layer.eval()
    x, pos = _x(2)
    seen = attention.explain(layer, x, pos, mode="train")
    c = seen["clusters"]                                      # [1, R, C, T]
    assert c.shape == (1, layer.routed_heads, 4, T)
    np.testing.assert_array_equal(c.sum(-1), layer.cluster_size_for(T))  # top-w: w each
    # a routed head's query attends only to keys sharing one of its clusters
    w = seen["weights"][0, layer.local_heads]
    shared = (c[0, 0][:, :, None] & c[0, 0][:, None, :]).any(0) | np.eye(T, dtype=bool)
    assert np.all(w[~shared] == 0.0)


def test_landmark_retrieved_blocks_and_weights():
    layer = _layer("landmark", landmark_every=16, landmark_top_k=1)
    x, pos = _x(3)
    seen = attention.explain(layer, x, pos)
    r, w = seen["retrieved"], seen["weights"]
    assert r.shape == (1, H, 4, 4)
    np.testing.assert_array_equal(np.diagonal(r, axis1=-2, axis2=-1), 0.5)
    assert np.all((r[..., 1:, :] == 1.0).sum(-1) == 1)  # one earlier block each (top 1)
    tokens = np.repeat(np.repeat(r > 0, 16, -2), 16, -1)
    assert np.all(w[~tokens] == 0.0)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name,options,mode", [
    ("softmax", {}, "train"),
    ("hip", dict(hip_mask_k=16, hip_block_q=16, hip_block_k=16, hip_window=16, hip_sink=0),
     "prefill"),
    ("routing", dict(routing_num_clusters=4, routing_local_window=16), "train"),
    ("landmark", dict(landmark_every=16, landmark_top_k=1), "prefill"),
    ("landmark", dict(landmark_every=16, landmark_top_k=1), "train"),
    ("complexformer", {}, "train"),
])
def test_a_batch_explains_as_its_rows_and_the_layer_is_unchanged(name, options, mode):
    """Two sequences explained together equal each explained alone (the one-hot values are
    stacked on the batch axis: an ordering mistake would mix the rows), and inspecting leaves
    the layer as it was (Routing's centroids not updated)."""
    from flax import nnx

    layer = _layer(name, **options)
    before = jax_leaves(nnx.state(layer))
    x, pos = _x(5, batch=2)
    both = attention.explain(layer, x, pos, mode=mode)
    for b in range(2):
        alone = attention.explain(layer, x[b:b + 1], pos[b:b + 1], mode=mode)
        for key, value in alone.items():
            np.testing.assert_allclose(both[key][b:b + 1] if both[key].shape[0] == 2
                                       else both[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    for a, b in zip(before, jax_leaves(nnx.state(layer))):
        np.testing.assert_array_equal(a, b)


def jax_leaves(state):
    import jax
    return [np.asarray(v) for v in jax.tree.leaves(state)]


def test_landmark_training_weights_are_its_grouped_softmax():
    """Landmark in training: the weights explain reads off are the grouped softmax's own
    (grouped_softmax_attention's return_weights), for a batch of two."""
    from attention.landmark import grouped_softmax_attention, landmark_scores

    layer = _layer("landmark", landmark_every=16, landmark_top_k=1)
    x, pos = _x(6, batch=2)
    w = attention.explain(layer, x, pos, mode="train")["weights"]
    q, k = attention.queries_and_keys(layer, x, pos)
    q_raw = layer.q_proj(x).reshape(2, T, H, D // H)
    k_raw = layer.k_proj(x).reshape(2, T, H, D // H)
    s_land = landmark_scores(q_raw, layer._landmarks(k_raw))
    v = jnp.zeros_like(k)
    _, ref = grouped_softmax_attention(q, k, v, s_land, block=16, return_weights=True)
    np.testing.assert_allclose(w, np.asarray(ref), rtol=1e-4, atol=1e-6)


def test_linear_attention_is_refused_by_name():
    layer = _layer("gla")
    x, pos = _x()
    with pytest.raises(TypeError, match="GatedLinearAttention is not a softmax-family layer"):
        attention.explain(layer, x, pos)


@pytest.mark.parametrize("name", ["softmax", "complexformer", "act"])
def test_the_weights_reproduce_the_layer_output(name):
    """o_proj(sum_j w_ij v_j) with explain's weights is the layer's own output (ComplexFormer:
    its learned phases, moved off their initial values, not plain RoPE)."""
    options = {"act_heads": ("0:0", "0:1")} if name == "act" else {}
    layer = _layer(name, rope_theta=10000.0, **options)
    if name == "complexformer":
        layer.delta[...] = layer.delta[...] * 1.7
        layer.phase_bias[...] = layer.phase_bias[...] + 0.4
    if name == "act":
        layer.set_layer(0)
    x, pos = _x(7, batch=2)
    w = attention.explain(layer, x, pos, mode="train")["weights"]            # [B, H, T, T]
    v = np.asarray(layer.project(x, "train")[2], np.float64)                  # [B, T, H_kv, hd]
    y = np.einsum("bhij,bjhd->bihd", w, v).reshape(2, T, D)
    expected = np.asarray(layer(x, positions=pos)[0])
    np.testing.assert_allclose(np.asarray(layer.o_proj(jnp.asarray(y, jnp.float32))), expected,
                               rtol=1e-4, atol=1e-5)
