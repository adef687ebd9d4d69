"""Where a train step's time goes on this CPU: the jitted LM train step (the bare loop of
bench/train.py: same model, same optax optimizer) traced with jax.profiler, its time summed per
HLO instruction and grouped (matmuls, attention, elementwise / reduction fusions, the optimizer
update, copies and layout changes, the rest). Prints the machine, the groups and the top
instructions with their HLO; never asserts.

    python bench/step_profile.py [--variant peer_a] [--layers 4 --d_model 256 --heads 4 --seq 512
                            --batch 8] [--steps 4] [--top 25] [overrides ...]
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import attention  # noqa: E402,F401  (XLA:CPU flags before jax starts)
import jax  # noqa: E402

from trainer.perf import machine_line  # noqa: E402
from bench.train import bare_step, config_for  # noqa: E402


def instruction_texts(hlo: str) -> dict[str, str]:
    """HLO instruction name -> its line, for every instruction of the optimized module."""
    out = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)", line)
        if m:
            out.setdefault(m.group(1), m.group(2))
    return out


def fusion_bodies(hlo: str) -> dict[str, str]:
    """fused computation name -> its body's text (to classify a fusion by what it computes)."""
    out, name, body = {}, None, []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ENTRY\s+)?(%?[\w.\-]+)\s*(?:\(|\{)", line)
        if line and not line.startswith(" ") and m and "{" in line:
            name, body = m.group(1).lstrip("%"), []
        elif line.startswith("}") and name:
            out[name] = "\n".join(body)
            name = None
        elif name:
            body.append(line)
    return out


def wall_shares(data, texts: dict, steps: int):
    """({HLO op: ms of wall time per step}, idle ms per step, span ms per step) from a trace.

    XLA:CPU records each thunk on the thread that runs it; a dot runs asynchronously (its event
    is the dispatch, an "end: <name>" event marks its completion), so an op's interval is from
    its event's start to its end marker where there is one. Every instant is split evenly among
    the ops in flight then, so the shares add up to the span; instants with none are idle."""
    starts, ends = {}, {}
    for plane in data.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for ev in line.events:
                name = ev.name[5:] if ev.name.startswith("end: ") else ev.name
                if name not in texts:
                    continue
                if ev.name.startswith("end: "):
                    ends.setdefault(name, []).append(ev.start_ns + ev.duration_ns)
                else:
                    starts.setdefault(name, []).append((ev.start_ns, ev.start_ns + ev.duration_ns))
    edges = []
    for name, ss in starts.items():
        es = sorted(ends.get(name, []))
        for i, (s0, s1) in enumerate(sorted(ss)):
            e = max(s1, es[i]) if i < len(es) else s1
            edges += [(s0, 1, name), (e, -1, name)]
    edges.sort(key=lambda x: (x[0], -x[1]))
    shares, idle, active, t_prev = collections.Counter(), 0.0, collections.Counter(), edges[0][0]
    for t, d, name in edges:
        n = sum(active.values())
        if n:
            for op, c in active.items():
                shares[op] += (t - t_prev) * c / n
        else:
            idle += t - t_prev
        active[name] += d
        if not active[name]:
            del active[name]
        t_prev = t
    span = edges[-1][0] - edges[0][0]
    scale = 1e-6 / steps
    return (collections.Counter({k: v * scale for k, v in shares.items()}), idle * scale,
            span * scale)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source_lines(hlo: str, texts: dict) -> dict[str, str]:
    """HLO instruction -> "file:line function" of the innermost frame of this project's code
    that emitted it (the module's stack-frame tables; the optimizer's own code is optax)."""
    tables, table = {}, None
    for line in hlo.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            table = tables.setdefault(line, {})
        elif table is not None:
            m = re.match(r"(\d+) (.*)", line)
            if not m:
                table = None
                continue
            table[int(m.group(1))] = m.group(2)
    files = {k: v.strip('"') for k, v in tables.get("FileNames", {}).items()}
    funcs = {k: v.strip('"') for k, v in tables.get("FunctionNames", {}).items()}
    locs = {}
    for k, v in tables.get("FileLocations", {}).items():
        f = re.search(r"file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", v)
        if f:
            locs[k] = (files.get(int(f.group(1)), "?"), funcs.get(int(f.group(2)), "?"),
                       int(f.group(3)))
    frames = {}
    for k, v in tables.get("StackFrames", {}).items():
        f = re.search(r"file_location_id=(\d+) parent_frame_id=(\d+)", v)
        if f:
            frames[k] = (int(f.group(1)), int(f.group(2)))

    def where(frame: int) -> str:
        seen, outer = set(), None
        while frame in frames and frame not in seen:
            seen.add(frame)
            loc, parent = frames[frame]
            path, func, line = locs.get(loc, ("?", "?", 0))
            if path.startswith(ROOT) and "site-packages" not in path:
                return f"{os.path.relpath(path, ROOT)}:{line} {func}"
            outer = outer or (f"{path.split('site-packages/')[-1]}:{line} {func}")
            frame = parent
        return outer or "?"

    out = {}
    for name, text in texts.items():
        f = re.search(r"stack_frame_id=(\d+)", text)
        out[name] = where(int(f.group(1))) if f else "?"
    return out


def _shape(text: str) -> list[int]:
    m = re.match(r"\w+\[([\d,]*)\]", text)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


def dot_flops(text: str, texts: dict) -> float:
    """2 * output elements * contracted size of a dot instruction (nan if unreadable)."""
    out = _shape(text)
    lhs = re.search(r"dot\(%?([\w.\-]+)", text)
    dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", text)
    if not (out and lhs and dims and lhs.group(1) in texts):
        return float("nan")
    shape = _shape(texts[lhs.group(1)])
    k = 1
    for d in dims.group(1).split(","):
        k *= shape[int(d)]
    n = 1
    for d in out:
        n *= d
    return 2.0 * n * k


def classify(name: str, text: str, bodies: dict[str, str]) -> str:
    """The group an executed HLO instruction belongs to, from its opcode and (for a fusion) the
    ops of its fused computation."""
    op = re.search(r"\]\S*\s+([\w\-]+)\(", text) or re.search(r"\)\s+([\w\-]+)\(", text)
    op = op.group(1) if op else text.split("(")[0].split()[-1] if text else "?"
    if op in ("dot", "convolution") or "__onednn$matmul" in text or "xnn" in text and "dot" in text:
        return "matmul (dot)"
    if op == "fusion":
        called = re.search(r"calls=%?([\w.\-]+)", text)
        body = bodies.get(called.group(1), "") if called else ""
        kind = re.search(r"kind=(\w+)", text)
        if " dot(" in body:
            return "matmul fusion (dot + elementwise)"
        if " exponential(" in body and " reduce(" in body:
            return "softmax / exp+reduce fusion"
        if " reduce(" in body:
            return "reduction fusion"
        if " transpose(" in body or " copy(" in body and body.count("\n") < 3:
            return "layout fusion (transpose / copy)"
        if " sqrt(" in body or " rsqrt(" in body and " divide(" in body:
            return "elementwise fusion (optimizer-like: sqrt / divide)"
        return f"elementwise fusion ({kind.group(1) if kind else '?'})"
    if op in ("copy", "transpose"):
        return "layout (copy / transpose)"
    if op in ("all-reduce", "reduce-scatter", "all-gather"):
        return "collective"
    if op in ("while", "conditional", "call"):
        return "control flow"
    return f"other ({op})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="peer_a")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="traced steps")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    shapes = [f"model.num_layers={a.layers}", f"model.d_model={a.d_model}",
              f"model.num_heads={a.heads}", f"model.num_kv_heads={a.heads}",
              f"model.mlp_dim={4 * a.d_model}", f"model.max_len={a.seq}",
              f"data.seq_len={a.seq}", f"train.global_batch_size={a.batch}"]
    config = config_for(a.variant, 2, [*(shapes if a.variant.startswith("peer") else []),
                                       *a.overrides])
    step, state, batches = bare_step(config)
    compiled = step.lower(state, batches[0]).compile()
    hlo = compiled.as_text()
    texts, bodies = instruction_texts(hlo), fusion_bodies(hlo)
    for i in range(2):  # warm
        state, loss = step(state, batches[i % len(batches)])
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            t0 = time.perf_counter()
            for i in range(a.steps):
                state, loss = step(state, batches[i % len(batches)])
            jax.block_until_ready((state, loss))
            wall = (time.perf_counter() - t0) / a.steps
        paths = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f.endswith(".xplane.pb")]
        data = jax.profiler.ProfileData.from_file(paths[0])
    per_op, idle, span = wall_shares(data, texts, a.steps)
    groups = collections.Counter()
    for name, ms in per_op.items():
        groups[classify(name, texts[name], bodies)] += ms
    total = sum(per_op.values()) + idle
    groups["idle (no HLO op in flight: dispatch, host)"] = idle
    print(machine_line())
    print(f"config {a.variant} {' '.join(shapes if a.variant.startswith('peer') else [])} "
          f"{' '.join(a.overrides)}")
    print(f"step wall {wall * 1e3:.0f} ms under the profiler, {span:.0f} ms from the first op "
          f"to the last; each instant is shared among the HLO ops in flight then (an async dot "
          f"runs from its dispatch to its \"end:\" event)\n")
    print("| group | ms / step | share |\n|---|---|---|")
    for g, ms in groups.most_common():
        print(f"| {g} | {ms:.1f} | {ms / total:.1%} |")
    lines = source_lines(hlo, texts)
    by_line = collections.Counter()
    for name, ms in per_op.items():
        by_line[lines.get(name, "?")] += ms
    print(f"\n| source line (innermost frame of this project) | ms / step | share |\n|---|---|---|")
    for where, ms in by_line.most_common(a.top):
        print(f"| {where} | {ms:.1f} | {ms / total:.1%} |")
    dots = {n: dot_flops(texts[n], texts) for n in per_op if " dot(" in texts[n]}
    dot_ms = sum(per_op[n] for n in dots)
    print(f"\ndots: {sum(dots.values()) / 1e9:.1f} GFLOP a step in {dot_ms:.0f} ms of wall time: "
          f"{sum(dots.values()) / dot_ms / 1e6:.1f} GFLOP/s against the matmul peak above")
    print(f"\n| top HLO instruction | ms / step | group | GFLOP/s (dots) | HLO |\n|---|---|---|---|---|")
    for name, ms in per_op.most_common(a.top):
        t = texts[name]
        rate = f"{dots[name] / ms / 1e6:.0f}" if name in dots else ""
        print(f"| {name} | {ms:.1f} | {classify(name, t, bodies)} | {rate} | `{t[:150]}` |")


if __name__ == "__main__":
    main()
