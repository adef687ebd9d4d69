"""The optimizer from config: AdamW with linear warmup + cosine decay, global-norm clipping."""
from __future__ import annotations

import jax
import optax


def lr_schedule(config) -> optax.Schedule:
    t = config.train
    horizon = t.schedule_steps or t.steps
    warmup = min(t.warmup_steps, horizon)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.lr, warmup_steps=warmup,
        decay_steps=max(horizon, warmup + 1), end_value=t.lr * t.min_lr_ratio)


def make_optimizer(config) -> optax.GradientTransformation:
    t = config.train
    # weight decay only on matrices (kernels, embeddings), not on norms' scales or biases
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    adamw = optax.adamw(lr_schedule(config), b1=t.b1, b2=t.b2, eps=t.eps,
                        weight_decay=t.weight_decay, mask=decay_mask)
    if t.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), adamw)
    return adamw
