"""Quality and attention cost of training-free sparse prefill on a trained softmax LM (the second
part of bench/sparse.py; run through it). Prints, never asserts.

The LM of `--workdir` (a softmax run, e.g. configs/lm.py:long) is rebuilt once per method with
`config.model.attention = <method>`: the sparse prefill layers share SoftmaxAttention's
parameters, so the checkpoint loads unchanged. Each eval batch runs through mode="prefill" (the
path generation takes for a prompt) at the model's training context; loss is the mean next-byte
cross entropy. Attention cost = (query, key) pairs computed, summed over layers and heads, from
what each sparse layer sows as nnx.Intermediate "attention_pairs"; dense causal computes
T (T + 1) / 2 per head and layer.
"""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import attention
from models.lm import LM, LMTask
from trainer.checkpoint import Checkpoints


def _train(workdir: str, steps: int) -> None:
    """configs/lm.py:long for `steps` steps into `workdir` (what `python -m trainer.main
    --config=configs/lm.py:long --workdir=... --config.train.steps=N` runs)."""
    import os

    from trainer.cli import load_config
    from trainer.trainer import Trainer

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = load_config(os.path.join(root, "configs", "lm.py") + ":long",
                         [f"train.steps={steps}", "sample.max_new_tokens=0"])
    t0 = time.perf_counter()
    with Trainer(config, workdir, quiet=True) as t:
        t.fit()
    print(f"(trained configs/lm.py:long for {steps} steps into {workdir} in "
          f"{time.perf_counter() - t0:.0f} s: --train_steps, no checkpoint was there)")


def _load(workdir: str, train_steps: int = 0):
    ck = Checkpoints(workdir, async_save=False)
    step = ck.latest_step()
    if step is None and train_steps:
        ck.close()
        _train(workdir, train_steps)
        ck = Checkpoints(workdir, async_save=False)
        step = ck.latest_step()
    if step is None:
        raise SystemExit(f"bench/sparse.py --part quality: no checkpoint in {workdir!r}; train one "
                         f"first: python -m trainer.main --config=configs/lm.py:long "
                         f"--workdir={workdir} (or pass --train_steps N)")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    params = ck.restore_params(step, mesh)
    config = ml_collections.ConfigDict(ck.restore_config(step))
    ck.close()
    return step, params, config


def _build(config, spec: str, params: dict, notes: list[str] | None = None):
    """spec: `name` or `name:field=value,field=value` (config.model fields of the mechanism)."""
    method, _, opts = spec.partition(":")
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.model.attention = method
    for key, value in getattr(attention.get(method), "CONFIG_DEFAULTS", {}).items():
        if key not in cfg.model:
            cfg.model[key] = value
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        if key not in cfg.model:
            raise SystemExit(f"{spec}: {method} has no field {key!r}")
        cfg.model[key] = type(cfg.model[key])(value)
    model = LM(cfg.model, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    flat = {"/".join(str(k) for k in path): v for path, v in nnx.to_flat_state(state)}
    new = sorted(set(flat) - set(params))  # e.g. Landmark's landmark keys: they keep their init
    if new:  # into `notes`, said below a table (a line inside one breaks the Markdown)
        note = (f"{spec}: {len(new)} parameters not in the checkpoint keep their initial "
                f"values ({', '.join(n.split('/')[-1] for n in new[:2])}, ...).")
        if notes is None:
            print(note)
        else:
            notes.append(note)
    for path, var in nnx.to_flat_state(state):
        name = "/".join(str(k) for k in path)
        if name in params:
            var.value = jnp.asarray(params[name])
    nnx.update(model, state)
    return model


def _eval(model, batches, T: int):
    @nnx.jit
    def run(model, tokens):
        B = tokens.shape[0]
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        cache = model.init_cache(B, T)
        (logits, _), inter = nnx.capture(model, nnx.Intermediate)(
            tokens[:, :-1], positions=positions, cache=cache, mode="prefill")
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)[..., 0]
        pairs = [v for path, v in jax.tree_util.tree_flatten_with_path(inter)[0]  # per layer
                 if any(getattr(k, "key", None) == "attention_pairs" for k in path)]
        return jnp.mean(nll), (sum(pairs) if pairs else jnp.float32(-1))

    losses, pairs, t0 = [], [], None
    for i, tokens in enumerate(batches):
        loss, p = run(model, jnp.asarray(tokens))
        loss, p = float(loss), float(p)
        if i == 0:
            t0 = time.perf_counter()  # the first batch compiles
        losses.append(loss)
        pairs.append(p)
    secs = (time.perf_counter() - t0) / max(len(batches) - 1, 1)
    return float(np.mean(losses)), float(np.mean(pairs)), secs


def quality_part(a):
    step, params, config = _load(a.workdir, a.train_steps)
    task = LMTask(config)
    T = config.data.seq_len  # windows hold seq_len + 1 bytes: seq_len inputs, seq_len targets
    ds = task.eval_data()
    bs = 2
    batches = [np.stack([ds[i * bs + j]["tokens"] for j in range(bs)]) for i in range(a.batches)]
    m = config.model
    dense_pairs = m.num_layers * m.num_heads * T * (T + 1) / 2
    print(f"\n{a.workdir} (step {step}): {m.num_layers} layers x {m.d_model}, {m.num_heads} heads, "
          f"context {T}; {a.batches} eval batches of {bs}, mode=prefill")
    print("\n| method | eval loss | vs dense | attention pairs | dense / method | s / batch |")
    print("|---|---|---|---|---|---|")
    dense_loss, notes = None, []
    for method in ["softmax"] + [x for x in a.methods.split(";") if x]:
        model = _build(config, method, params, notes)
        loss, pairs, secs = _eval(model, batches, T)
        pairs = dense_pairs if method == "softmax" else pairs
        dense_loss = loss if method == "softmax" else dense_loss
        rel = (loss / dense_loss - 1) * 100
        ratio = dense_pairs / pairs if pairs > 0 else math.nan
        print(f"| {method} | {loss:.4f} | {rel:+.2f}% | {pairs:,.0f} | {ratio:.2f}x | {secs:.2f} |")
    if notes:
        print("\n" + "\n".join(notes))
