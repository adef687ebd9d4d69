"""Attention mechanisms side by side: every LM mechanism trained with the same budget, the
inference-time methods on the trained softmax LM, and the vision variants. Prints, never asserts.

    python bench/compare.py [--steps 300] [--only lm|vision] [--vision_steps 0] [--probe_steps 0]

LM table (configs/lm.py:tiny shapes: 2 layers x 64, 4 query / 2 key-value heads, SwiGLU, RoPE;
batch 8, lr 3e-3, warmup 20 then cosine, the same --steps for every row; the context is 256
bytes instead of tiny's 64 so that the block-sparse methods have blocks to choose from):
- trained rows: `model.attention=<name>` for softmax, gla, hedgehog (from scratch, no
  distillation), routing, landmark, ssa, moh, complexformer, and TokenFormer
  (configs/tokenformer.py:tiny: the same d_model / layers / heads, context, batch and schedule,
  64 / 128 parameter tokens), and softmax on the tokens of a 1,024-token byte-level BPE trained
  on the embedded train split (bits per byte stay per byte of the held-out text). Eval bits/byte: the Trainer's evaluation (eval.batches batches of
  the held-out files); tokens/s: the Trainer's own train throughput (all steps after the first,
  which compiles); peak memory: XLA's memory analysis of the compiled train step, arguments +
  outputs - donated (aliased) + temporaries, the bytes live at once.
- eval-time rows: the trained softmax LM's parameters in a model whose attention is HiP,
  FlexPrefill, DHSA, Landmark retrieval or ACT (heads chosen by models.lm.act_search.search_heads on 4
  calibration batches of training data), run on the same eval batches through mode="prefill"
  (the path a prompt takes; the sparse methods are dense in mode="train"); tokens/s: eval
  throughput of that prefill (compile excluded); peak memory: the compiled prefill's arguments +
  outputs + temporaries. A "softmax (prefill)" row is the dense reference of the same procedure.

Vision table: configs/vit.py:tiny (softmax), :moh at 3 of 4 routed heads (75%) and with
model.moh_top_k=2 (50%), configs/iformer.py:tiny, and EP / linear probes on the frozen ViT
backbone (bench/vision.py's runs). Accuracy: top-1 on the held-out shapes (chance 12.5%).

Tables go to stdout and to bench/results/compare-lm.md / compare-vision.md.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))

ROOT = os.path.dirname(_HERE)
RESULTS = os.path.join(_HERE, "results")

# the trained LM rows: (label, config spec, extra overrides)
LM_TRAINED = [
    ("softmax", "configs/lm.py:tiny", ["model.attention=softmax"]),
    ("gla", "configs/lm.py:tiny", ["model.attention=gla"]),
    ("hedgehog", "configs/lm.py:tiny", ["model.attention=hedgehog"]),
    ("routing", "configs/lm.py:tiny", ["model.attention=routing"]),
    ("landmark", "configs/lm.py:tiny", ["model.attention=landmark", "model.landmark_every=32"]),
    ("ssa", "configs/lm.py:tiny", ["model.attention=ssa", "model.ssa_block_size=32"]),
    ("moh", "configs/lm.py:tiny", ["model.attention=moh"]),
    ("complexformer", "configs/lm.py:tiny", ["model.attention=complexformer"]),
    ("tokenformer", "configs/tokenformer.py:tiny", []),
    # the softmax LM on a byte-level BPE's tokens (trained here on the embedded train split):
    # the same steps of 8 x 256 tokens, each token ~2.6 bytes of text
    ("softmax, BPE 1024", "configs/lm.py:tiny",
     ["model.attention=softmax", "data.tokenizer={bpe}", "model.vocab_size=1024"]),
]
BPE_VOCAB = 1024
# eval-time rows on the trained softmax LM: (label, mechanism spec for bench/sparse_quality._build)
# blocks of 32 over the 256-byte context (8 blocks); budgets of about a third of the pairs
LM_EVAL_TIME = [
    ("softmax (prefill)", "softmax"),
    ("hip", "hip:hip_block_q=32,hip_block_k=32,hip_mask_k=32,hip_window=32,hip_sink=16"),
    ("flexprefill", "flexprefill:flex_block=32,flex_min_budget=32,flex_gamma=0.9"),
    ("dhsa", "dhsa:dhsa_block_q=32,dhsa_block_k=32,dhsa_chunk_size=16,dhsa_topk=32,dhsa_window=32"),
    ("landmark retrieval",
     "landmark:landmark_every=32,landmark_top_k=2,landmark_inference=standard"),
    ("act", "act"),
]
SEQ_LEN, BATCH, LR, WARMUP = 256, 8, 3e-3, 20

LM_COLUMNS = ["mechanism", "kind", "parameters", "eval bits/byte", "tokens/s", "peak memory MiB",
              "notes"]
LM_FORMATS = {"parameters": ",d", "eval bits/byte": ".4f", "tokens/s": ",.0f",
              "peak memory MiB": ",.1f"}
VISION_COLUMNS = ["model", "attention", "parameters (trained)", "accuracy", "images/s", "notes"]


# ----------------------------------------------------------------------------- Markdown
def markdown_table(columns: list[str], rows: list[dict], formats: dict | None = None) -> str:
    """rows: dicts keyed by column names (missing -> empty) -> a Markdown table (no trailing
    newline). formats: column -> format spec for its numbers (default: LM_FORMATS); numbers
    without one: integers with thousands separators, floats to 4 significant places."""
    formats = LM_FORMATS if formats is None else formats
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, ""), formats.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def fmt(v, spec: str | None = None) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if spec:
            return format(v, spec)
        return f"{v:,}" if isinstance(v, int) else f"{v:,.4g}"
    return str(v).replace("|", "\\|")


def write_result(name: str, text: str, directory: str = RESULTS) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}.md")
    with open(path + ".tmp", "w") as f:
        f.write(text.rstrip("\n") + "\n")
    os.replace(path + ".tmp", path)
    return path


def _header(cmd: str) -> str:
    import jax

    from trainer import perf
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"`{cmd}` ({now}; jax {jax.__version__}, {jax.device_count()} x "
            f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores)\n\n"
            f"{perf.machine_line()}")


def _mib(n: float) -> float:
    return n / 2**20


def compiled_peak_bytes(compiled, donated: bool) -> float:
    """XLA's memory analysis of a compiled function: arguments + outputs (- aliased when the
    arguments are donated) + temporaries; nan when the backend gives none."""
    mem = compiled.memory_analysis()
    if mem is None:
        return math.nan
    alias = mem.alias_size_in_bytes if donated else 0
    return float(mem.argument_size_in_bytes + mem.output_size_in_bytes - alias
                 + mem.temp_size_in_bytes)


# ----------------------------------------------------------------------------- LM
def lm_overrides(steps: int) -> list[str]:
    return [f"train.steps={steps}", f"train.global_batch_size={BATCH}", f"train.lr={LR}",
            f"train.warmup_steps={WARMUP}", f"data.seq_len={SEQ_LEN}", f"train.log_every={steps}",
            "eval.every=0", "checkpoint.every=0", "checkpoint.async_save=false",
            "sample.max_new_tokens=0"]


def train_lm(label: str, spec: str, extra: list[str], steps: int, workdir: str) -> dict:
    """One trained row; also returns the model's parameters and config (for eval-time rows)."""
    import jax
    from flax import nnx

    from trainer import Trainer, load_config

    c = load_config(os.path.join(ROOT, spec), extra + lm_overrides(steps))
    t0 = time.perf_counter()
    with Trainer(c, workdir, quiet=True) as t:
        result = t.fit()
        row = {"mechanism": label, "kind": "trained", "parameters": t.num_params(),
               "eval bits/byte": result["eval"]["bits_per_byte"],
               "tokens/s": result["metrics"][f"perf/{t.task.throughput_unit}/s"],
               "peak memory MiB": _mib(compiled_peak_bytes(t._train_step, donated=True))}
        params = {"/".join(str(k) for k in p): jax.device_get(v.get_value())
                  for p, v in nnx.to_flat_state(nnx.state(t.model, nnx.Param))}
        extra_info = {"params": params, "config": c, "task": t.task}
    print(f"  {label}: {row['eval bits/byte']:.4f} bits/byte, {row['tokens/s']:,.0f} tokens/s, "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return row, extra_info


def eval_prefill(model, batches) -> dict:
    """Mean next-byte loss of `model` over `batches` ([B, T + 1] tokens) through mode="prefill",
    the (query, key) pairs its sparse layers report, tokens/s (compile excluded) and the compiled
    function's peak bytes."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    graphdef, state = nnx.split(model)

    def run(state, tokens):
        m = nnx.merge(graphdef, state)
        B, T = tokens.shape[0], tokens.shape[1] - 1
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        (logits, _), inter = nnx.capture(m, nnx.Intermediate)(
            tokens[:, :-1], positions=positions, cache=m.init_cache(B, T), mode="prefill")
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)[..., 0]
        pairs = [v for path, v in jax.tree_util.tree_flatten_with_path(inter)[0]
                 if any(getattr(k, "key", None) == "attention_pairs" for k in path)]
        return jnp.mean(nll), (sum(pairs) if pairs else jnp.float32(-1))

    tokens = [jnp.asarray(b["tokens"]) for b in batches]
    compiled = jax.jit(run).lower(state, tokens[0]).compile()
    compiled(state, tokens[0])[0].block_until_ready()  # warm-up
    losses, pairs = [], []
    t0 = time.perf_counter()
    for tok in tokens:
        loss, p = compiled(state, tok)
        losses.append(float(loss))
        pairs.append(float(p))
    secs = time.perf_counter() - t0
    n = sum(int(t.shape[0]) * (int(t.shape[1]) - 1) for t in tokens)
    return {"loss": float(np.mean(losses)), "pairs": float(np.mean(pairs)), "tokens_s": n / secs,
            "peak": compiled_peak_bytes(compiled, donated=False)}


def eval_time_rows(softmax: dict, landmark: dict | None) -> tuple[list[dict], list[str]]:
    """The eval-time rows on the trained softmax LM (and Landmark retrieval on the trained
    Landmark LM too, whose landmark keys were learned)."""
    import attention.act as act
    from models.lm.act_search import search_heads
    from bench.sparse_quality import _build
    from models.lm.prune import calibration_batches, eval_batches

    config, params, task = softmax["config"], softmax["params"], softmax["task"]
    batches = eval_batches(task, config)
    m = config.model
    T = config.data.seq_len
    dense_pairs = m.num_layers * m.num_heads * T * (T + 1) / 2
    n_params = sum(int(v.size) for v in params.values())
    rows, notes = [], []
    for label, spec in LM_EVAL_TIME:
        model = _build(config, spec, params)
        note = ""
        if label == "act":
            calib = calibration_batches(task, config, 4)
            found = search_heads(model, calib)
            act.set_heads(model, found["heads"])
            note = (f"heads {','.join(found['heads']) or '(none)'} of "
                    f"{m.num_layers * m.num_heads} (search: {found['tried']} tried)")
        model.eval()
        r = eval_prefill(model, batches)
        if label.startswith("softmax"):
            dense_loss = r["loss"]
        elif r["pairs"] > 0:
            note = f"{r['pairs'] / dense_pairs:.0%} of the dense (query, key) pairs"
        if label == "landmark retrieval":
            note += "; landmark keys untrained (the softmax LM has none)"
        rows.append({"mechanism": label, "kind": "eval-time on softmax",
                     "parameters": n_params if label != "landmark retrieval" else _count(model),
                     "eval bits/byte": r["loss"] / math.log(2), "tokens/s": r["tokens_s"],
                     "peak memory MiB": _mib(r["peak"]), "notes": note})
        print(f"  {label}: {r['loss'] / math.log(2):.4f} bits/byte", file=sys.stderr, flush=True)
    if landmark is not None:
        spec = dict(LM_EVAL_TIME)["landmark retrieval"]
        model = _build(landmark["config"], spec, landmark["params"])
        model.eval()
        r = eval_prefill(model, eval_batches(landmark["task"], landmark["config"]))
        rows.append({"mechanism": "landmark retrieval", "kind": "eval-time on landmark",
                     "parameters": _count(model), "eval bits/byte": r["loss"] / math.log(2),
                     "tokens/s": r["tokens_s"], "peak memory MiB": _mib(r["peak"]),
                     "notes": f"{r['pairs'] / dense_pairs:.0%} of the dense pairs; the trained "
                              "landmark LM's own landmark keys"})
    notes.insert(0, f"eval-time rows: the same {len(batches)} eval batches of "
                    f"{config.train.global_batch_size} x {T} bytes through mode=\"prefill\"; "
                    f"dense softmax (prefill) reference {dense_loss / math.log(2):.4f} bits/byte")
    return rows, notes


def _count(model) -> int:
    from flax import nnx
    return sum(int(v.get_value().size) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def lm_table(steps: int, cmd: str) -> str:
    from trainer.tokenizer import documents, train_bpe

    rows, keep = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        bpe = os.path.join(tmp, "bpe")
        train_bpe(documents(()), BPE_VOCAB, bpe, progress=False)
        for label, spec, extra in LM_TRAINED:
            extra = [e.replace("{bpe}", bpe) for e in extra]
            try:
                row, info = train_lm(label, spec, extra, steps, os.path.join(tmp, label))
            except Exception as e:  # one broken mechanism must not hide the others
                print(f"  {label}: FAILED {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                rows.append({"mechanism": label, "kind": "trained",
                             "notes": f"failed: {type(e).__name__}: {str(e)[:120]}"})
                continue
            rows.append(row)
            if label in ("softmax", "landmark"):
                keep[label] = info
        notes = []
        if "softmax" in keep:
            ev_rows, notes = eval_time_rows(keep["softmax"], keep.get("landmark"))
            rows += ev_rows
    first = {"hedgehog": "from scratch (no softmax distillation)",
             "tokenformer": "configs/tokenformer.py:tiny: same d_model / layers / heads, "
                            "64 / 128 parameter tokens",
             "moh": "1 shared + top-2 of 3 routed heads", "landmark": "blocks of 32",
             "ssa": "blocks of 32, keep 25% in training, dense eval",
             "routing": "4 clusters, 2 local heads",
             "softmax, BPE 1024": "a byte-level BPE of 1,024 tokens (python -m trainer.tokenizer "
                                  "train) on the train split: 256 tokens of ~2.6 bytes each"}
    for r in rows:
        if r["kind"] == "trained" and not r.get("notes"):
            r["notes"] = first.get(r["mechanism"], "")
    text = "\n".join([
        _header(cmd), "",
        f"Every trained row: {steps} steps of {BATCH} x {SEQ_LEN} bytes (tokens of the BPE for "
        f"its row), lr {LR} (warmup "
        f"{WARMUP}, cosine), 2 layers x 64, 4 heads (2 key-value heads where the mechanism has "
        "them). Bits per byte: per byte of the held-out text whatever the tokenizer. tokens/s: training throughput for trained rows, prefill (eval) throughput for "
        "eval-time rows. Peak memory: XLA memory analysis of the compiled train step (arguments + "
        "outputs - donated + temporaries), of the compiled prefill for eval-time rows.", "",
        markdown_table(LM_COLUMNS, rows), "", *[f"{n}." for n in notes]])
    return text


# ----------------------------------------------------------------------------- vision
def vision_table(steps: int, probe_steps: int, cmd: str) -> str:
    from bench.vision import train

    runs = [  # (model, attention, family, variant, overrides, note)
        ("ViT tiny", "softmax", "vit", "tiny", [], "4 heads"),
        ("ViT tiny", "MoH 75%", "vit", "moh", [], "3 of 4 routed heads per token"),
        ("ViT tiny", "MoH 50%", "vit", "moh", ["model.moh_top_k=2"],
         "2 of 4 routed heads per token"),
        ("ViT tiny", "GLA, both directions", "vit", "tiny", ["model.attention=gla"],
         "linear attention: a forward and a backward scan summed"),
        ("ViT tiny", "Hedgehog", "vit", "tiny", ["model.attention=hedgehog"],
         "linear attention, unmasked, trained from scratch"),
        ("iFormer tiny", "softmax (inception mixer)", "iformer", "tiny", [], "32 px images"),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        vit_src = os.path.join(tmp, "vit_tiny")
        for model, attn, family, variant, over, note in runs:
            wd = vit_src if (family, variant, over) == ("vit", "tiny", []) else \
                os.path.join(tmp, f"{family}_{variant}_{len(rows)}")
            try:
                r = train(family, variant, wd, steps, over)
            except Exception as e:
                rows.append({"model": model, "attention": attn,
                             "notes": f"failed: {type(e).__name__}: {str(e)[:120]}"})
                continue
            rows.append({"model": model, "attention": attn,
                         "parameters (trained)": f"{r['params']:,} ({r['trained']:,})",
                         "accuracy": f"{r['accuracy']:.1%}", "images/s": r["images_s"],
                         "notes": f"{note}; {r['steps']} steps x {r['batch']}"})
            print(f"  {model} {attn}: {r['accuracy']:.1%}", file=sys.stderr, flush=True)
        if os.path.isdir(vit_src):
            for probe, label in (("probe_ep", "EP probe"), ("probe_linear", "linear probe")):
                r = train("vit", probe, os.path.join(tmp, probe), probe_steps,
                          [f"init_from={vit_src}"])
                rows.append({"model": f"ViT tiny + {label}", "attention": "softmax (frozen)",
                             "parameters (trained)": f"{r['params']:,} ({r['trained']:,})",
                             "accuracy": f"{r['accuracy']:.1%}", "images/s": r["images_s"],
                             "notes": f"frozen ViT tiny backbone; {r['steps']} steps x "
                                      f"{r['batch']}"})
                print(f"  {label}: {r['accuracy']:.1%}", file=sys.stderr, flush=True)
    return "\n".join([
        _header(cmd), "",
        "Embedded shapes (8 kinds, chance 12.5%), top-1 on the held-out images; images/s: "
        "training throughput (the Trainer's own, compile and eval excluded).", "",
        markdown_table(VISION_COLUMNS, rows, {"images/s": ",.0f"})])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300, help="LM train steps, every trained row")
    p.add_argument("--only", choices=["lm", "vision"], default=None)
    p.add_argument("--vision_steps", type=int, default=0,
                   help="ViT / iFormer steps (0: each config's: 1500 ViT, 500 iFormer)")
    p.add_argument("--probe_steps", type=int, default=0, help="probe steps (0: the config's, 300)")
    p.add_argument("--results", default=RESULTS, help="folder for the Markdown tables")
    a = p.parse_args(argv)
    cmd = "python bench/compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
    cmd = cmd.strip()
    t0 = time.perf_counter()
    if a.only in (None, "lm"):
        text = lm_table(a.steps, cmd)
        print("\n### LM\n\n" + text + "\n", flush=True)
        write_result("compare-lm", text, a.results)
    if a.only in (None, "vision"):
        text = vision_table(a.vision_steps, a.probe_steps, cmd)
        print("\n### Vision\n\n" + text + "\n", flush=True)
        write_result("compare-vision", text, a.results)
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
