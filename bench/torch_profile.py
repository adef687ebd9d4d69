"""Where PyTorch eager's train step of the peers' GPT (../shared/peers/torch_gpt.py) spends its
time on this CPU: torch.profiler's self CPU time per op over a few steps, grouped like
bench/step_profile.py (matmuls, attention, elementwise / norms, optimizer). Prints, never asserts.

    <torch venv>/bin/python bench/torch_profile.py [--peers ../shared/peers] [--layers 4
        --d_model 256 --heads 4 --seq 512 --batch 8] [--steps 3] [--top 25]
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GROUPS = (  # (group, op-name fragments), first match wins
    ("matmul (mm / addmm / bmm)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul")),
    ("attention (SDPA flash kernel)", ("flash_attention", "scaled_dot_product")),
    ("optimizer (AdamW)", ("_foreach", "adam", "Optimizer.step")),
    ("layout (copy / transpose / cat)", ("aten::copy_", "aten::clone", "aten::contiguous",
                                        "aten::cat", "aten::t", "aten::transpose")),
)


def group(name: str) -> str:
    low = name.lower()
    return next((g for g, keys in GROUPS if any(k.lower() in low for k in keys)),
                "elementwise / norms / loss / other")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", default=os.path.join(os.path.dirname(ROOT), "shared", "peers"),
                    help="the folder holding torch_gpt.py")
    for k, v in dict(layers=4, d_model=256, heads=4, seq=512, batch=8, steps=3, top=25,
                     threads=2).items():
        ap.add_argument(f"--{k}", type=int, default=v)
    a = ap.parse_args()
    if not os.path.isfile(os.path.join(a.peers, "torch_gpt.py")):
        sys.exit(f"--peers {a.peers!r}: no torch_gpt.py there (the peers' folder, "
                 "../shared/peers in the project's checkout)")
    sys.path.insert(0, a.peers)
    sys.argv = sys.argv[:1]  # torch_gpt parses its own arguments at import
    import torch
    import torch_gpt
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = torch_gpt.GPT(a.layers, a.d_model, a.heads, a.seq)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    data = torch.randint(0, torch_gpt.VOCAB, (a.batch, a.seq + 1))

    def step():
        loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e3 / a.steps
    groups = collections.Counter()
    for e in events:
        groups[group(e.key)] += e.self_cpu_time_total / 1e3 / a.steps
    print(f"torch {torch.__version__}, {a.threads} threads, config {a.layers}L x {a.d_model}, "
          f"seq {a.seq}, batch {a.batch}: self CPU time {total:.0f} ms a step (main thread's "
          f"view: an op's time includes its intra-op threads)\n")
    print("| group | ms / step | share |\n|---|---|---|")
    for g, ms in groups.most_common():
        print(f"| {g} | {ms:.1f} | {ms / total:.1%} |")
    print("\n| op | ms / step | calls / step |\n|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:a.top]:
        print(f"| {e.key} | {e.self_cpu_time_total / 1e3 / a.steps:.1f} | "
              f"{e.count // a.steps} |")


if __name__ == "__main__":
    main()
