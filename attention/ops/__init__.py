"""Functional attention ops, layout [batch, seq, heads, head_dim], each with impl dispatch.

The rotary position embedding lives here because every positional self-attention uses it.
"""
from attention.ops.rope import apply_rope

__all__ = ["apply_rope"]
