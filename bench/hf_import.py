"""Peak host memory of `python -m trainer.convert import-hf` (issue 26 item 1): a random
Llama-shaped checkpoint of ~1B parameters (configs/lm.py:1b's shapes: 16 layers x 2048, 32 / 8
heads, MLP 8192, an untied 32k vocabulary; float32 safetensors, written tensor by tensor)
imported in a subprocess; its peak resident memory (VmHWM) against the largest tensor and
the whole checkpoint. The process baseline is the same command on the tiny golden Llama
(tests/goldens/llama_tiny): the interpreter, jax, orbax and an abstract model. Goal: peak -
baseline below 1.3x the largest tensor (not 1x the model). Then spot-checks that the
checkpoint holds the file's tensors.

    python bench/hf_import.py [--layers 16] [--d_model 2048] [--vocab 32768]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def llama_shapes(layers: int, d: int, heads: int, kv: int, mlp: int, vocab: int) -> dict:
    hd = d // heads
    out = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,),
           "lm_head.weight": (vocab, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (heads * hd, d),
                    p + "self_attn.k_proj.weight": (kv * hd, d),
                    p + "self_attn.v_proj.weight": (kv * hd, d),
                    p + "self_attn.o_proj.weight": (d, heads * hd),
                    p + "mlp.gate_proj.weight": (mlp, d), p + "mlp.up_proj.weight": (mlp, d),
                    p + "mlp.down_proj.weight": (d, mlp),
                    p + "input_layernorm.weight": (d,),
                    p + "post_attention_layernorm.weight": (d,)})
    return out


def write_model(out: str, shapes: dict, config: dict) -> int:
    """config.json + model.safetensors of random float32 tensors, one tensor in memory at a
    time; returns the file's bytes."""
    import numpy as np

    os.makedirs(out, exist_ok=True)
    header, offset = {}, 0
    for name in sorted(shapes):
        n = int(np.prod(shapes[name])) * 4
        header[name] = {"dtype": "F32", "shape": list(shapes[name]),
                        "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    rng = np.random.default_rng(0)
    with open(os.path.join(out, "model.safetensors"), "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for name in sorted(shapes):
            f.write((rng.standard_normal(shapes[name], dtype=np.float32) * 0.02).tobytes())
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f)
    return offset


def import_peak(hf_dir: str, run_dir: str) -> tuple[float, float]:
    """(peak RSS in bytes, seconds) of one import-hf in a fresh process: its VmHWM (the
    high-water mark of its own address space; ru_maxrss would include the parent's at fork)."""
    code = ("import sys, time; from trainer.convert import main; t = time.time(); "
            "rc = main(['import-hf', sys.argv[1], sys.argv[2]]); "
            "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')]; "
            "print('RESULT', hwm[0], time.time() - t); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, hf_dir, run_dir], cwd=ROOT,
                       capture_output=True, text=True, timeout=3600,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if p.returncode:
        raise SystemExit(f"import-hf failed:\n{p.stderr[-3000:]}")
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT")][-1].split()
    return float(line[1]) * 1024, float(line[2])


def main() -> None:
    a = argparse.ArgumentParser()
    a.add_argument("--layers", type=int, default=16)
    a.add_argument("--d_model", type=int, default=2048)
    a.add_argument("--heads", type=int, default=32)
    a.add_argument("--kv_heads", type=int, default=8)
    a.add_argument("--mlp", type=int, default=8192)
    a.add_argument("--vocab", type=int, default=32768)
    args = a.parse_args()
    import numpy as np

    from trainer.hf import SafeTensors
    from trainer.perf import _cpu_name

    shapes = llama_shapes(args.layers, args.d_model, args.heads, args.kv_heads, args.mlp,
                          args.vocab)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "vocab_size": args.vocab, "hidden_size": args.d_model,
              "intermediate_size": args.mlp, "num_hidden_layers": args.layers,
              "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
              "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
              "hidden_act": "silu", "max_position_embeddings": 4096}
    params = sum(int(np.prod(s)) for s in shapes.values())
    largest = max(int(np.prod(s)) * 4 for s in shapes.values())
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        t0 = time.perf_counter()
        size = write_model(os.path.join(tmp, "hf"), shapes, config)
        write_s = time.perf_counter() - t0
        base, _ = import_peak(os.path.join(ROOT, "tests", "goldens", "llama_tiny"),
                              os.path.join(tmp, "tiny_run"))
        peak, secs = import_peak(os.path.join(tmp, "hf"), os.path.join(tmp, "run"))
        ckpt = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
                   os.walk(os.path.join(tmp, "run", "checkpoints")) for f in fs)
        # spot checks: three tensors as the checkpoint holds them, against the file
        from trainer.checkpoint import Checkpoints
        import jax
        c = Checkpoints(os.path.join(tmp, "run"), async_save=False)
        cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        flat = c.restore_flat(0, lambda n, s: cpu)
        c.close()
        st = SafeTensors(os.path.join(tmp, "hf", "model.safetensors"))
        checks = {"nnx/0/embed/embedding": ("model.embed_tokens.weight", lambda w: w),
                  "nnx/0/blocks/1/attn/k_proj/kernel": (
                      "model.layers.1.self_attn.k_proj.weight", lambda w: w.T),
                  "nnx/0/lm_head/kernel": ("lm_head.weight", lambda w: w.T)}
        exact = all(np.array_equal(np.asarray(flat[ours]), f(st[hf]))
                    for ours, (hf, f) in checks.items())
        del flat
    gib = 1 << 30
    print(f"{_cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}; a random "
          f"Llama of {params / 1e9:.2f}B parameters ({args.layers} layers x {args.d_model}, "
          f"{args.heads} / {args.kv_heads} heads, MLP {args.mlp}, vocabulary {args.vocab}, "
          f"untied), float32 safetensors written in {write_s:.0f} s\n")
    print("| checkpoint | largest tensor | import s | peak RSS | process baseline (tiny "
          "import) | peak - baseline | / largest tensor | / checkpoint | tensors exact |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {size / gib:.2f} GiB | {largest / gib:.3f} GiB | {secs:.0f} | {peak / gib:.2f} GiB "
          f"| {base / gib:.2f} GiB | {(peak - base) / gib:.2f} GiB | {(peak - base) / largest:.2f}x"
          f" | {(peak - base) / size:.2f}x | {'yes' if exact else 'NO'} |")
    print(f"\nthe run's checkpoint: {ckpt / gib:.2f} GiB (parameters only; a run resuming it "
          "starts a fresh optimizer at step 0)")


if __name__ == "__main__":
    main()
