"""AMP — Attention heads and MLP pruning (Mugnaini et al., 2025) of a trained language model.

    python -m trainer.prune --config=configs/lm.py:tiny --from=RUN --ratio=0.3 --out=DIR \
        [--batches=N] [--config.<field>=<value> ...]

1. Loads RUN's newest checkpoint with the config saved in it (over --config's defaults, then the
   --config.<field> overrides: e.g. eval.batches).
2. On N calibration batches of train data (train.global_batch_size each), measures
   head importance   I_h = mean over tokens of || x_h W_O[h] ||_1  (x_h: head h's attention
                     output, W_O[h]: its rows of the output projection; its contribution to the
                     residual stream), and
   neuron importance I_m = mean over tokens of | input m of the down projection |
                     (SwiGLU: silu(x W1)_m (x W3)_m; GELU MLP: gelu(x W_fc)_m).
3. Removes the lowest round(ratio * n) (half up) of each layer's heads and MLP neurons: every
   layer keeps the same number, so the result is a plain config with smaller model.num_heads
   (model.head_dim set explicitly, unchanged) and model.mlp_dim. Parameters are sliced: q_proj
   columns, o_proj rows (and k/v columns, see GQA), MLP up/gate columns, down rows.
   GQA (num_kv_heads < num_heads): a key/value head is shared by its group of query heads, so
   whole groups are pruned (group importance: the sum of its heads'); round(ratio *
   num_kv_heads) groups go and num_heads shrinks by that many groups. With num_kv_heads ==
   num_heads, single heads.
4. Writes DIR as a normal run at step 0 (a fresh optimizer and data position: the source's Adam
   moments have the old shapes and AMP fine-tunes afterwards anyway) with the pruned config, and
   prints parameter counts, eval loss and forward tokens/s before and after, and the command
   that fine-tunes it (`python -m trainer.main --config=... --workdir=DIR --config.model.num_heads=...`;
   `--config.train.steps=0` only evaluates it).

Refused: --ratio outside (0, 1) or leaving no head / neuron, a --from without checkpoint, a
non-empty --out (never overwritten), a family other than the LM, an attention mechanism whose
layer has parameters besides the q/k/v/o projections (its per-head slicing is unknown).
"""
from __future__ import annotations

import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

import attention
from attention.act import format_heads, parse_heads
from attention.softmax import SoftmaxAttention
from models.lm.model import LM
from trainer.api import as_tuples, open_run
from trainer.checkpoint import path_name
from trainer.cli import load_config, parse_with_overrides, tool_parser
from trainer.config import ConfigError
from trainer.data import process_batches
from trainer.trainer import Trainer

ATTN_PARAMS = {"q_proj/kernel", "k_proj/kernel", "v_proj/kernel", "o_proj/kernel"}
MLP_LAYERS = {"swiglu": (("w1", "w3"), "w2"), "gelu": (("fc",), "proj")}  # (up/gate, down)


def calibration_batches(task, config, n: int) -> list[dict]:
    """The first n train batches (numpy, train.global_batch_size examples each)."""
    it = iter(process_batches(task.train_data(), config.train.global_batch_size, prefetch=0))
    return [next(it) for _ in range(n)]


def eval_batches(task, config) -> list[dict]:
    """The eval batches the Trainer evaluates on (eval.batches, train.global_batch_size each)."""
    out = []
    for b in process_batches(task.eval_data(), config.train.global_batch_size, prefetch=0):
        if len(out) >= max(config.eval.batches, 1):
            break
        out.append(b)
    return out


# ----------------------------------------------------------------------------- importance
def head_contributions(attn, y):
    """y [..., H * hd] (o_proj's input: the heads' outputs side by side) -> [..., H, D]: each
    head's x_h W_O[h]; their sum over H is o_proj(y)."""
    return _contributions(y, attn.o_proj.kernel.get_value(), attn.num_heads, attn.head_dim)


def _contributions(y, kernel, H: int, hd: int):
    w = kernel.reshape(H, hd, -1)
    # AMP (Mugnaini et al. 2025, head importance): head h's contribution x_h W_O[h]
    return jnp.einsum("...hk,hkd->...hd", y.reshape(*y.shape[:-1], H, hd).astype(jnp.float32),
                      w.astype(jnp.float32))


class _Probe(nnx.Module):
    """Wraps a projection and sows an importance statistic of its input (nnx.Intermediate)."""

    def __init__(self, inner, kind: str, heads: tuple[int, int] = (0, 0)):
        self.inner = inner
        self.kind = kind
        self.heads = heads  # (H, hd) of an o_proj

    def __call__(self, x):
        if self.kind == "heads":
            # AMP: I_h = mean over tokens of || x_h W_O[h] ||_1
            stat = jnp.abs(_contributions(x, self.inner.kernel.get_value(), *self.heads)).sum(-1)
        else:
            # AMP: I_m = mean over tokens of |input m of the down projection|
            stat = jnp.abs(x.astype(jnp.float32))
        self.sow(nnx.Intermediate, f"amp_{self.kind}",
                 stat.reshape(-1, stat.shape[-1]).mean(0))
        return self.inner(x)


def _mlp_names(cfg):
    kind = getattr(cfg, "mlp", "swiglu")
    if kind not in MLP_LAYERS:
        raise ConfigError(f"config.model.mlp={kind!r}: pruning knows {', '.join(MLP_LAYERS)}")
    return MLP_LAYERS[kind]


def importance(model, model_config, batches) -> list[dict]:
    """Per layer {"heads": [H], "mlp": [mlp_dim]} AMP importances, averaged over `batches`
    (dicts with "tokens" [B, T+1]; the first T tokens are the input)."""
    _, down = _mlp_names(model_config)
    probe = nnx.merge(*nnx.split(model))  # a copy to wrap
    for block in probe.blocks:
        block.attn.o_proj = _Probe(block.attn.o_proj, "heads",
                                     (block.attn.num_heads, block.attn.head_dim))
        setattr(block.mlp, down, _Probe(getattr(block.mlp, down), "mlp"))
    graphdef, state = nnx.split(probe)

    @jax.jit
    def stats(state, tokens):
        m = nnx.merge(graphdef, state)
        _, inter = nnx.capture(m, nnx.Intermediate)(tokens[:, :-1])
        leaves = jax.tree_util.tree_flatten_with_path(inter)[0]
        out = [{} for _ in m.blocks]
        for path, v in leaves:
            keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
            layer = keys[keys.index("blocks") + 1]
            kind = next(k[len("amp_"):] for k in keys if isinstance(k, str) and k.startswith("amp_"))
            out[int(layer)][kind] = v
        return out

    total = None
    for b in batches:
        s = stats(state, jnp.asarray(b["tokens"]))
        total = s if total is None else jax.tree.map(jnp.add, total, s)
    return [{k: np.asarray(v) / len(batches) for k, v in layer.items()} for layer in total]


# ----------------------------------------------------------------------------- pruning
def n_removed(ratio: float, n: int) -> int:
    """round(ratio * n), halves rounded up."""
    return int(math.floor(ratio * n + 0.5))


def check_prunable(config, ratio: float) -> None:
    """Clear errors for what pruning cannot do (before anything is computed)."""
    if not (isinstance(ratio, (int, float)) and 0.0 < ratio < 1.0):
        raise ConfigError(f"--ratio={ratio}: allowed values are in (0, 1), the share of heads and "
                          "MLP neurons removed per layer")
    if config.task != "lm":
        raise ConfigError(f"config.task={config.task!r}: pruning slices the language model's "
                          "blocks; allowed: 'lm'")
    m = config.model
    try:
        cls = attention.get(m.attention)
    except KeyError as e:
        raise ConfigError(f"config.model.attention: {e.args[0]}") from None
    if not issubclass(cls, SoftmaxAttention):
        raise ConfigError(f"config.model.attention={m.attention!r} has no per-head o_proj slicing "
                          "(its layer is not a SoftmaxAttention); allowed: 'softmax' and the "
                          "SoftmaxAttention subclasses without parameters of their own (e.g. 'act')")
    _mlp_names(m)
    if m.get("mlp_bias"):  # (attention biases: check_attention_params)
        raise ConfigError("config.model.mlp_bias=True: pruning slices the kernels of bias-free "
                          "MLPs only; allowed: False")
    groups = m.num_kv_heads if m.num_kv_heads != m.num_heads else m.num_heads
    what = "key/value head groups (model.num_kv_heads" if groups != m.num_heads else \
        "heads (model.num_heads"
    if n_removed(ratio, groups) >= groups:
        raise ConfigError(f"--ratio={ratio} removes all {groups} {what}={groups}) of each layer; "
                          f"allowed: ratio < {(groups - 0.5) / groups:.3g} (at least one left)")
    if n_removed(ratio, m.mlp_dim) >= m.mlp_dim:
        raise ConfigError(f"--ratio={ratio} removes all config.model.mlp_dim={m.mlp_dim} MLP "
                          "neurons; allowed: a smaller ratio")


def check_attention_params(model) -> None:
    for i, block in enumerate(model.blocks):
        names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(block.attn, nnx.Param))}
        extra = sorted(names - ATTN_PARAMS)
        if extra:
            raise ConfigError(f"config.model.attention={type(block.attn).__name__}: layer {i} has "
                              f"parameters besides q/k/v/o projections ({', '.join(extra[:4])}), "
                              "whose per-head slicing is unknown; allowed: attention layers with "
                              "only q_proj/k_proj/v_proj/o_proj (e.g. 'softmax', 'act')")


def choose(scores: list[dict], model_config, ratio: float) -> list[dict]:
    """Per layer, the kept (sorted) query heads, key/value heads and MLP neurons."""
    H, Hkv = model_config.num_heads, model_config.num_kv_heads
    G = H // Hkv
    keep = []
    for s in scores:
        if Hkv == H:
            kv = np.sort(np.argsort(-s["heads"], kind="stable")[:H - n_removed(ratio, H)])
        else:  # whole groups: query heads g*G .. g*G+G-1 share key/value head g
            group = s["heads"].reshape(Hkv, G).sum(-1)
            kv = np.sort(np.argsort(-group, kind="stable")[:Hkv - n_removed(ratio, Hkv)])
        heads = (kv[:, None] * G + np.arange(G)[None]).reshape(-1)
        M = s["mlp"].shape[0]
        mlp = np.sort(np.argsort(-s["mlp"], kind="stable")[:M - n_removed(ratio, M)])
        keep.append({"heads": heads, "kv": kv, "mlp": mlp})
    return keep


def pruned_config(config, keep: list[dict]):
    """The config of the pruned model: fewer heads (head_dim explicit), smaller mlp_dim, ACT
    heads renumbered (removed ones dropped), no init_from."""
    c = ConfigDict(config.to_dict())  # a copy, unlocked
    m = c.model
    hd = m.head_dim or m.d_model // m.num_heads
    m.head_dim = hd
    m.num_heads = len(keep[0]["heads"])
    m.num_kv_heads = len(keep[0]["kv"])
    m.mlp_dim = len(keep[0]["mlp"])
    if "act_heads" in m and m.act_heads:  # ACT's chosen heads follow the renumbering
        new = [(l, int(np.flatnonzero(keep[l]["heads"] == h)[0]))
               for l, h in parse_heads(m.act_heads) if h in keep[l]["heads"]]
        m.act_heads = format_heads(new)
    c.init_from = ""
    c.lock()
    return c


def prune_params(params: dict[str, np.ndarray], keep: list[dict], model_config, hd: int
                 ) -> dict[str, np.ndarray]:
    """Slices {path: array} of the LM's parameters ('blocks/0/attn/q_proj/kernel', ...)."""
    ups, down = _mlp_names(model_config)
    out = dict(params)

    def cols(heads):  # feature columns of the given heads in a [*, H * hd] projection
        return (np.asarray(heads)[:, None] * hd + np.arange(hd)[None]).reshape(-1)

    for i, k in enumerate(keep):
        a, m = f"blocks/{i}/attn", f"blocks/{i}/mlp"
        out[f"{a}/q_proj/kernel"] = params[f"{a}/q_proj/kernel"][:, cols(k["heads"])]
        out[f"{a}/k_proj/kernel"] = params[f"{a}/k_proj/kernel"][:, cols(k["kv"])]
        out[f"{a}/v_proj/kernel"] = params[f"{a}/v_proj/kernel"][:, cols(k["kv"])]
        out[f"{a}/o_proj/kernel"] = params[f"{a}/o_proj/kernel"][cols(k["heads"]), :]
        for up in ups:
            out[f"{m}/{up}/kernel"] = params[f"{m}/{up}/kernel"][:, k["mlp"]]
        out[f"{m}/{down}/kernel"] = params[f"{m}/{down}/kernel"][k["mlp"], :]
    return out


def model_params(model) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.array(jax.device_get(v.get_value()))
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def load_params(model, params: dict) -> None:
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        v.set_value(jnp.asarray(params["/".join(map(str, p))]))


def prune(model, config, ratio: float, batches, *, scores=None) -> tuple[object, dict, list[dict]]:
    """AMP on an LM: (pruned config, pruned parameters {path: array}, kept indices per layer).
    scores: importance(model, config.model, batches) when already computed."""
    check_prunable(config, ratio)
    check_attention_params(model)
    if scores is None:
        scores = importance(model, config.model, batches)
    keep = choose(scores, config.model, ratio)
    m = config.model
    hd = m.head_dim or m.d_model // m.num_heads
    return pruned_config(config, keep), prune_params(model_params(model), keep, m, hd), keep


def build_lm(config, params: dict | None = None):
    """config's LM (f32), with `params` loaded when given."""
    if params is None:
        return LM(config.model, rngs=nnx.Rngs(config.seed))
    model = nnx.eval_shape(lambda: LM(config.model, rngs=nnx.Rngs(config.seed)))
    load_params(model, params)  # every parameter is set: no initialisation to compute
    return model


def num_params(params: dict) -> int:
    return sum(int(np.prod(v.shape)) for v in params.values())


def forward_tokens_per_s(model, tokens, reps: int = 5) -> float:
    """Tokens/s of the jitted forward (logits) on one device: the best of `reps` timed runs."""
    graphdef, state = nnx.split(model)
    dev = jax.devices()[0]
    state = jax.device_put(jax.device_get(state), dev)
    tokens = jax.device_put(jnp.asarray(tokens), dev)
    f = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])
    jax.block_until_ready(f(state, tokens))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(state, tokens))
        best = min(best, time.perf_counter() - t0)
    return tokens.size / best


# ----------------------------------------------------------------------------- writing the run
def write_run(config, params: dict, out: str, *, quiet: bool = True):
    """A normal run directory `out` at step 0 (fresh optimizer and data position) holding
    `params`; returns the Trainer on it (for evaluation)."""
    t = Trainer(config, out, quiet=quiet)
    state = t.initial_state()
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    new, used = [], set()
    for path, leaf in leaves:
        name = path_name(path)
        short = name[len("nnx/0/"):] if name.startswith("nnx/0/") else None
        if short in params:
            value = params[short]
            if tuple(value.shape) != tuple(leaf.shape):
                raise ConfigError(f"pruned {short}: shape {value.shape}, the pruned config builds "
                                  f"{leaf.shape}")
            leaf = jax.device_put(jnp.asarray(value, leaf.dtype), leaf.sharding)
            used.add(short)
        new.append(leaf)
    missing = sorted(set(params) - used)
    if missing:
        raise ConfigError(f"the pruned model lacks {', '.join(missing[:4])}")
    t.state = jax.tree_util.tree_unflatten(treedef, new)
    t.save()
    t.checkpoints.wait()
    return t


def _cli_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (tuple, list)):
        return ",".join(map(str, v)) if v else "()"
    return str(v)


def overrides_for(config, spec: str) -> list[str]:
    """--config.<field>=<value> flags that turn --config's file into `config` (its leaves)."""
    base = load_config(spec).to_dict()
    flags = []

    def walk(ours: dict, theirs: dict, prefix: str):
        for k, v in ours.items():
            if isinstance(v, dict):
                walk(v, theirs.get(k, {}) if isinstance(theirs.get(k), dict) else {}, f"{prefix}{k}.")
            elif k not in theirs or as_tuples(theirs[k]) != as_tuples(v):
                flags.append(f"--config.{prefix}{k}={_cli_value(v)}")
    walk(config.to_dict(), base, "")
    return flags


# ----------------------------------------------------------------------------- command line
def parse_args(argv):
    p = tool_parser("python -m trainer.prune", __doc__.split("\n\n")[0], batches=8,
                    batches_help="calibration batches of train data for the importances")
    p.add_argument("--ratio", type=float, required=True,
                   help="share of each layer's heads and MLP neurons to remove, in (0, 1)")
    p.add_argument("--out", required=True, help="the new run directory (must not exist or be empty)")
    return parse_with_overrides(p, argv)


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
            raise ConfigError(f"--out={args.out!r} exists and is not empty; pruning never "
                              "overwrites a directory: name a new one")
        if not 0.0 < args.ratio < 1.0:  # before loading anything
            raise ConfigError(f"--ratio={args.ratio}: allowed values are in (0, 1), the share "
                              "of heads and MLP neurons removed per layer")
        run = open_run(args.config, overrides, args.source,  # trainer.api: reopening a run
                       check=lambda c: check_prunable(c, args.ratio))
        before = run.trainer.evaluate()
        n_before = run.trainer.num_params()
        calib = calibration_batches(run.task, run.config, args.batches)
        new_config, params, keep = prune(run.model, run.config, args.ratio, calib)
        trainer = write_run(new_config, params, args.out)
        after = trainer.evaluate()
        n_after = trainer.num_params()
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: --from: {e}" if isinstance(e, FileNotFoundError) else f"error: {e}",
              file=sys.stderr)
        return 2
    m0, m1 = run.config.model, new_config.model
    tokens = eval_batches(run.task, run.config)[0]["tokens"][:, :-1]
    speed0 = forward_tokens_per_s(run.model, tokens)
    speed1 = forward_tokens_per_s(trainer.model, tokens)
    print(f"pruned {run.workdir} (step {run.step}) at ratio {args.ratio} on {len(calib)} "
          f"calibration batches -> {trainer.checkpoints.step_dir(0)}")
    print(f"heads per layer {m0.num_heads} -> {m1.num_heads} (kv {m0.num_kv_heads} -> "
          f"{m1.num_kv_heads}, head_dim {m1.head_dim}); mlp_dim {m0.mlp_dim} -> {m1.mlp_dim}")
    for i, k in enumerate(keep):
        print(f"  layer {i}: heads kept {k['heads'].tolist()}")
    print(f"parameters: {n_before:,} -> {n_after:,} ({n_after / n_before:.1%})")
    print(f"eval loss: {before['loss']:.5f} before, {after['loss']:.5f} after pruning "
          f"({before.get('bits_per_byte', float('nan')):.4f} -> "
          f"{after.get('bits_per_byte', float('nan')):.4f} bits/byte)")
    print(f"forward: {speed0:,.0f} -> {speed1:,.0f} tokens/s ({speed1 / speed0:.2f}x, one "
          f"device, batch {tokens.shape[0]} x {tokens.shape[1]})")
    flags = " ".join(f for f in overrides_for(new_config, args.config)
                     if not f.startswith("--config.train.steps="))
    print(f"fine-tune: python -m trainer.main --config={args.config} --workdir={args.out} {flags}"
          " --config.train.steps=<N>  (steps=0: evaluate only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
