"""ACT's offline head search (Yu et al., ICML 2024): which heads to calibrate in a trained LM.

`search_heads` tries the heads one at a time (layer by layer, greedily) on a few calibration
batches and keeps a head when the calibration loss drops. The mechanism itself is
attention/act.py; this is the LM family's tool around it.

    python -m models.lm.act_search --config=configs/lm.py:tiny --from=RUN [--batches=N] [--config.<f>=v]
prints the heads it chose, the calibration and eval loss before/after, and the override that
selects the heads in a run (--config.model.attention=act --config.model.act_heads=...).
"""
from __future__ import annotations

import math
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from attention.act import (ActHeads, act_layers, assign_layers, format_heads, parse_heads,
                           set_heads)
from models.lm.model import LM
from models.lm.prune import calibration_batches, eval_batches
from attention.registry import add_options
from trainer.api import open_run
from trainer.config import ConfigError
from trainer.cli import parse_with_overrides, tool_parser


def lm_loss(model, batch):
    """Mean next-token cross entropy of batch["tokens"] [B, T + 1] (nats)."""
    tokens = batch["tokens"]
    logits, _ = model(tokens[:, :-1])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1)[..., 0]
    return nll.mean()


def act_model_config(model_config):
    """A copy of a family's config.model with attention "act" (and the ACT defaults)."""
    cfg = model_config.copy_and_resolve_references() if hasattr(
        model_config, "copy_and_resolve_references") else model_config
    with cfg.unlocked():
        cfg.attention = "act"
        add_options(cfg)
    return cfg


def as_act_model(model, model_config=None):
    """`model` if its attention is already ACT, else an ACT LM (built from model_config) holding
    the same parameters."""
    if act_layers(model):
        return model
    if model_config is None:
        raise ValueError("search_heads: the model has no ACT attention layers; pass its "
                         "config.model (model_config=...) to build an ACT copy")
    act = LM(act_model_config(model_config), rngs=nnx.Rngs(0))
    nnx.update(act, nnx.state(model, nnx.Param))
    return act


class _Switched:
    """An ACT copy of a model whose heads are switched on and off by arrays (one compile for
    every choice of heads): loss(switches, batches) -> mean loss."""

    def __init__(self, model, loss_fn):
        model = nnx.merge(*nnx.split(model))  # a copy: the switches never reach the caller
        assign_layers(model)
        self.layers = act_layers(model)
        if not self.layers:
            raise ValueError("search_heads: no ACT attention layer in the model")
        for attn in self.layers:
            attn.act_switches = ActHeads(jnp.zeros((attn.num_heads,), bool))
        graphdef, self.state = nnx.split(model)

        def loss_of(state, switches, batch):
            m = nnx.merge(graphdef, state)
            m.eval()
            for attn, s in zip(act_layers(m), switches):
                attn.act_switches.set_value(s)
            return loss_fn(m, batch)
        self._loss = jax.jit(loss_of)

    def switches(self, heads=()) -> list:
        chosen = set(parse_heads(heads))
        return [jnp.asarray([(a.layer, h) in chosen for h in range(a.num_heads)])
                for a in self.layers]

    def loss(self, switches, batches) -> float:
        if not batches:
            raise ValueError("search_heads: no calibration batches")
        return sum(float(self._loss(self.state, switches, {"tokens": jnp.asarray(b["tokens"])}))
                   for b in batches) / len(batches)


def _switched(model_or_trainer, model_config, loss_fn) -> _Switched:
    if hasattr(model_or_trainer, "task") and hasattr(model_or_trainer, "config"):
        trainer = model_or_trainer
        model = as_act_model(trainer.model, trainer.config.model)
        loss_fn = loss_fn or (lambda m, b: trainer.task.loss(m, b)[0])
    else:
        model = as_act_model(model_or_trainer, model_config)
        loss_fn = loss_fn or lm_loss
    return _Switched(model, loss_fn)


def search_heads(model_or_trainer, batches, *, loss_fn=None, model_config=None, tol: float = 0.0,
                 log=None, eval_batches=None) -> dict:
    """Greedy ACT head selection on calibration batches.

    model_or_trainer: an LM (ACT or softmax: a softmax one needs model_config to build its ACT
    copy) or a Trainer (its model, config and Task loss). batches: dicts with "tokens" [B, T+1]
    (numpy or jax). Every head, layer by layer, is tried on top of those kept so far and kept if
    the mean calibration loss drops by more than `tol`. Returns {"heads": ("l:h", ...),
    "loss_before", "loss_after", "tried"}; loss_after <= loss_before by construction. With
    eval_batches, also "eval_before" / "eval_after": their loss without / with the heads."""
    sw = _switched(model_or_trainer, model_config, loss_fn)
    switches = sw.switches()
    before = best = sw.loss(switches, batches)
    chosen, tried = [], 0
    for li, attn in enumerate(sw.layers):
        for h in range(attn.num_heads):
            trial = list(switches)
            trial[li] = trial[li].at[h].set(True)
            loss = sw.loss(trial, batches)
            tried += 1
            keep = loss < best - tol
            if log:
                log(f"  head {attn.layer}:{h}: loss {loss:.5f} "
                    f"({'kept' if keep else 'not kept'}; best {best:.5f})")
            if keep:
                switches, best = trial, loss
                chosen.append((attn.layer, h))
    out = {"heads": format_heads(chosen), "loss_before": before, "loss_after": best,
           "tried": tried}
    if eval_batches is not None:
        out["eval_before"] = sw.loss(sw.switches(), eval_batches)
        out["eval_after"] = sw.loss(switches, eval_batches)
    return out


# ----------------------------------------------------------------------------- command line
def parse_args(argv):
    p = tool_parser("python -m models.lm.act_search", "Choose ACT heads for a trained LM and "
                    "report the loss before/after calibration.", batches=4)
    return parse_with_overrides(p, argv)


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run = open_run(args.config, overrides, args.source)
        if run.config.task != "lm":
            raise ConfigError(f"config.task={run.config.task!r}: ACT calibrates causal language "
                              "models; allowed: 'lm'")
        model = as_act_model(run.model, run.config.model)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: --from: {e}" if isinstance(e, FileNotFoundError) else f"error: {e}",
              file=sys.stderr)
        return 2
    calib = calibration_batches(run.task, run.config, args.batches)
    print(f"searching ACT heads of {args.source} (step {run.step}) on {len(calib)} calibration "
          f"batches (alpha {act_layers(model)[0].alpha}, beta {act_layers(model)[0].beta})")
    evals = eval_batches(run.task, run.config)
    found = search_heads(model, calib, log=print, eval_batches=evals)
    ev = {"before": found["eval_before"], "after": found["eval_after"]}
    print(f"heads: {', '.join(found['heads']) or '(none)'}")
    print(f"calibration loss: {found['loss_before']:.5f} before, {found['loss_after']:.5f} after")
    print(f"eval loss ({len(evals)} batches): {ev['before']:.5f} before, {ev['after']:.5f} after "
          f"({ev['before'] / math.log(2):.4f} -> {ev['after'] / math.log(2):.4f} bits/byte)")
    print("use them: --config.model.attention=act --config.model.act_heads="
          + (",".join(found["heads"]) or "''"))
    return 0


def search_eval(model, batches, heads) -> float:
    """Mean LM loss of an ACT model over `batches` with exactly `heads` calibrated (the static
    path a run with model.act_heads takes)."""
    model = nnx.merge(*nnx.split(model))
    set_heads(model, heads)
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, b: lm_loss(nnx.merge(graphdef, s), b))
    return sum(float(f(state, {"tokens": jnp.asarray(b["tokens"])})) for b in batches) / len(batches)


if __name__ == "__main__":
    sys.exit(main())
