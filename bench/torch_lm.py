"""PyTorch twin of polyformer's default LM (configs/lm.py:default), for bench/peer.py's
`--configs default` row: the same architecture, parameter count, optimizer and step as the
trainer, written from the model's definition in models/lm/model.py and attention/softmax.py.

  * byte vocabulary (256), embedding N(0, 1), untied head N(0, 1/sqrt(d)), no position embedding
  * pre-norm blocks: RMSNorm (scale, eps 1e-6); GQA causal softmax attention with RoPE (rotating
    the halves (x[:D/2], x[D/2:]), theta 10000) via F.scaled_dot_product_attention(enable_gqa);
    SwiGLU MLP (w2(silu(w1 x) * w3 x)); final RMSNorm
  * bias-free Linear layers, N(0, 0.02), residual outputs N(0, 0.02 / sqrt(2 layers))
  * AdamW (b1 0.9, b2 0.95, eps 1e-8, weight decay 0.1 on >= 2-D parameters), global-norm
    clipping at 1.0, f32

Prints one JSON line in ../shared/peers' format. Needs the peers' torch venv (TORCH_PY):

    $TORCH_PY bench/torch_lm.py --layers 3 --d_model 512 --heads 4 --kv_heads 2 --mlp 1408 \\
        --seq 256 --batch 16 --steps 10 --warmup 3 --threads 2 [--compile]
"""
import argparse
import json
import math
import os
import statistics
import time


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--mlp", type=int, default=1408)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


args = parse_args()
try:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
except (AttributeError, OSError):
    pass

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(args.threads)
VOCAB = 256


def linear(din, dout, std=0.02):
    lin = nn.Linear(din, dout, bias=False)
    nn.init.normal_(lin.weight, std=std)
    return lin


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale


def rope(x, cos, sin):
    """x [B, H, T, D]: rotate (x[:D/2], x[D/2:]) pairs (attention/ops/rope.py)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, d, h, hk, layers):
        super().__init__()
        self.h, self.hk, self.hd = h, hk, d // h
        self.q = linear(d, h * self.hd)
        self.k = linear(d, hk * self.hd)
        self.v = linear(d, hk * self.hd)
        self.o = linear(h * self.hd, d, 0.02 / math.sqrt(2 * layers))

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.h, self.hd).transpose(1, 2)
        k = self.k(x).view(B, T, self.hk, self.hd).transpose(1, 2)
        v = self.v(x).view(B, T, self.hk, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(B, T, self.h * self.hd))


class Block(nn.Module):
    def __init__(self, d, h, hk, mlp, layers):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(d), RMSNorm(d)
        self.attn = Attention(d, h, hk, layers)
        self.w1, self.w3 = linear(d, mlp), linear(d, mlp)
        self.w2 = linear(mlp, d, 0.02 / math.sqrt(2 * layers))

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        h = self.mlp_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class LM(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, a.d_model)
        nn.init.normal_(self.embed.weight, std=1.0)
        self.blocks = nn.ModuleList(Block(a.d_model, a.heads, a.kv_heads, a.mlp, a.layers)
                                    for _ in range(a.layers))
        self.norm = RMSNorm(a.d_model)
        self.head = linear(a.d_model, VOCAB, 1.0 / math.sqrt(a.d_model))
        hd = a.d_model // a.heads
        inv = 10000.0 ** (-torch.arange(0, hd // 2, dtype=torch.float32) * 2.0 / hd)
        angle = torch.arange(a.seq, dtype=torch.float32)[:, None] * inv
        self.register_buffer("cos", angle.cos(), persistent=False)
        self.register_buffer("sin", angle.sin(), persistent=False)

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = self.embed(idx)
        for b in self.blocks:
            x = b(x, self.cos[:T], self.sin[:T])
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.view(-1, VOCAB), targets.reshape(-1))


def main():
    torch.manual_seed(args.seed)
    model = LM(args)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=2e-3, betas=(0.9, 0.95), eps=1e-8)
    fwd = torch.compile(model) if args.compile else model
    g = torch.Generator().manual_seed(args.seed)
    pool = [torch.randint(0, VOCAB, (args.batch, args.seq), generator=g) for _ in range(4)]

    def step(i):
        data = pool[i % len(pool)]  # the trainer's windows: seq_len bytes, predict the next
        loss = fwd(data[:, :-1], data[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    times, losses, first = [], [], None
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        losses.append(step(i))
        dt = time.perf_counter() - t0
        first = dt if i == 0 else first
        if i >= args.warmup:
            times.append(dt)
    med = statistics.median(times)
    tokens = args.batch * args.seq
    print(json.dumps({
        "impl": "torch", "compile": bool(args.compile), "tokens_per_s": round(tokens / med, 1),
        "step_ms_median": round(med * 1e3, 2), "step_ms_min": round(min(times) * 1e3, 2),
        "step_ms_max": round(max(times) * 1e3, 2), "params": n_params,
        "flops_per_step_est": 6 * n_params * tokens + 12 * args.layers * args.d_model * args.seq * tokens,
        "first_step_s": round(first, 2), "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4), "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
