"""AMP pruning (models/lm/prune.py): per-head contributions add up to o_proj, slicing a head or an
MLP neuron out equals zeroing its output, and the CLI writes a smaller run the Trainer loads."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import TINY, make_tiny_config
from models.lm import LM
from models.lm import prune
from trainer.api import run_config


def test_head_contributions_sum_to_output_projection():
    cfg = make_tiny_config().model
    lm = LM(cfg, rngs=nnx.Rngs(0))
    attn = lm.blocks[0].attn
    y = jax.random.normal(jax.random.key(1), (2, 5, attn.num_heads * attn.head_dim))
    parts = prune.head_contributions(attn, y)  # [B, T, H, D]
    assert parts.shape == (2, 5, attn.num_heads, cfg.d_model)
    np.testing.assert_allclose(parts.sum(-2), attn.o_proj(y), atol=1e-5)


def test_refuses_what_it_cannot_prune_and_renumbers_act_heads():
    from trainer.config import ConfigError

    for ratio in (0.0, 1.0, -0.2):
        with pytest.raises(ConfigError, match="allowed values are in"):
            prune.check_prunable(make_tiny_config(), ratio)
    with pytest.raises(ConfigError, match=r"removes all 2 key/value head groups"):
        prune.check_prunable(make_tiny_config(), 0.75)  # GQA 4/2: whole groups
    with pytest.raises(ConfigError, match=r"config.model.attention='gla'.*allowed"):
        prune.check_prunable(make_tiny_config("model.attention=gla"), 0.3)
    with pytest.raises(ConfigError, match=r"config.model.mlp_bias=True: .*allowed: False"):
        prune.check_prunable(make_tiny_config("model.mlp_bias=true"), 0.3)
    config = make_tiny_config("model.attention=act", "model.num_kv_heads=4", "model.act_heads=0:1,0:2")
    keep = [{"heads": np.array([0, 2, 3]), "kv": np.array([0, 2, 3]), "mlp": np.arange(90)}]
    new = prune.pruned_config(config, keep)
    assert new.model.act_heads == ("0:1",) and new.model.num_heads == 3  # head 2 is now 1


@pytest.mark.parametrize("kv,mlp", [(4, "swiglu"), (2, "gelu")])
def test_slicing_equals_zeroing(kv, mlp):
    """The pruned LM's logits equal the original's with the removed heads' o_proj rows (their
    outputs) and the removed neurons' down-projection rows zeroed. kv=2: GQA, whole groups."""
    overrides = ("model.num_layers=2", f"model.num_kv_heads={kv}", f"model.mlp={mlp}")
    config = make_tiny_config(*overrides)
    lm = LM(config.model, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    batches = [{"tokens": rng.integers(0, 256, (4, 17), dtype=np.int32)}]
    scores = prune.importance(lm, config.model, batches)
    assert scores[0]["heads"].shape == (4,) and scores[0]["mlp"].shape == (config.model.mlp_dim,)
    new_config, params, keep = prune.prune(lm, config, 0.3, batches, scores=scores)
    m = new_config.model
    assert (m.num_heads, m.num_kv_heads, m.head_dim) == ((3, 3, 16) if kv == 4 else (2, 1, 16))
    assert m.mlp_dim == config.model.mlp_dim - round(0.3 * config.model.mlp_dim)
    # the lowest-importance ones went
    for s, k in zip(scores, keep):
        gone = np.setdiff1d(np.arange(len(s["mlp"])), k["mlp"])
        assert s["mlp"][gone].max() <= s["mlp"][k["mlp"]].min()
    small = prune.build_lm(new_config, params)

    zeroed = prune.model_params(lm)
    down = "w2" if mlp == "swiglu" else "proj"
    for i, k in enumerate(keep):
        rows = np.ones(4 * 16, bool)
        rows[(k["heads"][:, None] * 16 + np.arange(16)).reshape(-1)] = False
        zeroed[f"blocks/{i}/attn/o_proj/kernel"][rows] = 0.0
        neurons = np.ones(config.model.mlp_dim, bool)
        neurons[k["mlp"]] = False
        zeroed[f"blocks/{i}/mlp/{down}/kernel"][neurons] = 0.0
    ref = prune.build_lm(config, zeroed)
    tokens = jnp.asarray(batches[0]["tokens"][:, :-1])
    np.testing.assert_allclose(small(tokens)[0], ref(tokens)[0], atol=2e-5)  # eager: no compiles
    assert prune.num_params(params) < prune.num_params(prune.model_params(lm))


@pytest.mark.slow  # end to end: a run, the CLI, the Trainer
def test_cli_prunes_a_run_and_refuses_bad_input(tmp_path, capsys):
    from trainer import Trainer

    src = tmp_path / "run"  # a run's checkpoint (at step 0: the mechanics need no training)
    with Trainer(make_tiny_config("model.num_kv_heads=4"), str(src), quiet=True) as t:
        t.save()
        params_before = t.num_params()
    out = tmp_path / "pruned"
    base = [f"--config={TINY}", f"--from={src}", "--batches=1"]

    assert prune.main(base + ["--ratio=0.3", f"--out={out}"]) == 0
    printed = capsys.readouterr().out
    assert "parameters:" in printed and "eval loss:" in printed and "heads per layer 4 -> 3" in printed
    config = run_config(str(out), 0, spec=TINY, overrides=["train.steps=0"])
    assert (config.model.num_heads, config.model.head_dim) == (3, 16)
    with Trainer(config, str(out), quiet=True) as t:  # `--config.train.steps=0`: evaluate it
        result = t.fit()
        assert result["step"] == 0 and np.isfinite(result["eval"]["loss"])
        assert t.num_params() < params_before
    fine_tune = [f for f in printed.split("fine-tune: ")[1].split() if f.startswith("--config.")]
    assert "--config.model.num_heads=3" in fine_tune and "--config.model.mlp_dim=90" in fine_tune

    for bad, says in ((["--ratio=1.5", f"--out={tmp_path / 'a'}"], "--ratio=1.5: allowed"),
                      (["--ratio=0.9", f"--out={tmp_path / 'b'}"], "removes all 4 heads"),
                      (["--ratio=0.3", f"--out={out}"], "not empty")):
        assert prune.main(base + bad) == 2
        assert says in capsys.readouterr().err
    assert prune.main([f"--config={TINY}", f"--from={tmp_path / 'none'}", "--ratio=0.3",
                       f"--out={tmp_path / 'c'}"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert not any(os.path.exists(tmp_path / d) for d in "abc")  # nothing written on refusal
