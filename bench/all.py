"""Every benchmark in one command (`make bench`): each script in its own process, one after the
other, with a time limit; stdout saved as Markdown in bench/results/<name>.md (stderr in
runs/bench_logs/<name>.log); the README's
generated tables refreshed. Prints a summary; exits 1 if any benchmark failed or timed out.

    python bench/all.py [--quick | --full] [--only compare,train] [--skip detr] [--dry_run]
    python bench/all.py --readme_only   # only refresh README.md from bench/results/

--quick (the default): the comparison tables (compare) and vision at their documented budgets,
the others with reduced steps / lengths / repetitions, so the whole run is bounded (18 min on 2
idle cores, 2026-11-26); --full: each script's documented budget (hours).

README.md: every block between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` is replaced
by bench/results/NAME.md when this run rewrote that file (today: compare-lm and
compare-vision, written by bench/compare.py, and sparse, by bench/sparse.py); the other README
tables are edited by hand.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
LOGS = os.path.join(ROOT, "runs", "bench_logs")  # each benchmark's stderr (runs/ is git-ignored)

# name: (script, quick args, full args, quick timeout s, full timeout s)
BENCHMARKS = {
    # the README's comparison tables: the documented budget in both modes (at 100 LM / 300
    # vision steps the vision rows sit near chance, 16% of 8 classes; ~6 min on 2 idle cores)
    "compare": ("bench/compare.py", [], [], 1500, 3600),
    "train": ("bench/train.py", ["--reps", "2"], [], 600, 1800),
    "attention": ("bench/attention.py", ["--lengths", "1024,2048,4096", "--reps", "2"], [],
                  300, 1800),
    "tokenformer": ("bench/tokenformer.py", ["--steps", "200", "--eval_batches", "8"], [],
                    600, 2400),
    # the configs' budgets (~3 min for ViT and iFormer, ~5 more for video's STDHA and frame
    # averaging): at 300 steps the ViT sits near chance, and video's STDHA leaves chance only
    # after ~1500 steps
    "vision": ("bench/vision.py", [], [], 1500, 2400),
    "ast": ("bench/ast_petl.py", ["--steps", "200", "--adapt_steps", "60",
                             "--methods", "linear,adapter,lora,full"], [], 900, 3600),
    "detr": ("bench/detr.py", ["--steps", "1000", "--every", "500"], [], 900, 7200),
    # 1500 + 300 steps (~7 min): the full 3500 + 500 is the documented result
    "mixformer": ("bench/mixformer.py", ["--steps", "1500", "--score_steps", "300"], [], 1200,
                  3600),
    # kill -9 / SIGTERM / I/O error / corruption cycles with restarts (~2 min for 8)
    "resilience": ("bench/resilience.py", ["--cycles", "8"], ["--cycles", "24"], 600, 1800),
    # data.num_workers 0 vs 2 on an input-bound ViT (~2 min)
    "input": ("bench/input.py", ["--reps", "2"], ["--reps", "3"], 600, 1200),
    # pre-tokenized shards vs raw text, and the time to prepare the text (~3 min for 20 MB;
    # the documented 100 MB: ~10 min)
    "tokens": ("bench/tokens.py", ["--mb", "20", "--batches", "200"], [], 900, 2400),
    # import-hf's peak host memory on a random Llama: 4 layers quick, the documented 1.1B full
    # (~3 min, 9 GB of disk under $BENCH_TMP or /tmp)
    "hf_import": ("bench/hf_import.py", ["--layers", "4"], [], 900, 1800),
    # block-sparse attention vs dense, and the sparse prefill methods on a 2k-context softmax LM
    # (trained into runs/lm_long first when it has no checkpoint: 100 steps quick, 161 s on
    # 2026-12-07's AVX-512 host; the quick run 76 s with the LM there, ~4 min without)
    "sparse": ("bench/sparse.py", ["--part", "all", "--lengths", "2048,4096,8192", "--reps", "2",
                                   "--train_steps", "100", "--batches", "4"],
               ["--part", "all", "--train_steps", "200", "--batches", "6"], 1500, 3600),
}

MARKER = re.compile(r"(<!-- bench:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /bench:(?P=name) -->)",
                    re.S)


def replace_markers(text: str, tables: dict[str, str]) -> tuple[str, list[str]]:
    """Replaces the body of every `<!-- bench:NAME -->...<!-- /bench:NAME -->` block whose NAME
    is in `tables` with that table; returns (new text, names replaced). Other blocks and text
    are kept byte for byte."""
    done = []

    def sub(m):
        name = m.group("name")
        if name not in tables:
            return m.group(0)
        done.append(name)
        return m.group(1) + tables[name].rstrip("\n") + "\n" + m.group(4)

    return MARKER.sub(sub, text), done


def _failed_run(path: str) -> bool:
    """Whether a results file records a failed or timed-out run (run_one's first line)."""
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return bool(re.search(r" s, (failed|timeout)", f.readline()))


def update_readme(readme: str, names=None, since: float | None = None, failed=()) -> list[str]:
    """Rewrites the marked README blocks from bench/results/<name>.md: those in `names` (None:
    every marked block with a results file), and only files written after `since` when given;
    never from a benchmark in `failed` (block NAME or NAME-*: its table stays as it was)."""
    with open(readme) as f:
        text = f.read()
    tables = {}
    for m in MARKER.finditer(text):
        name = m.group("name")
        path = os.path.join(RESULTS, f"{name}.md")
        if name in failed or name.split("-")[0] in failed or _failed_run(path):
            continue
        if (names is None or name in names) and os.path.exists(path) and (
                since is None or os.path.getmtime(path) >= since):
            with open(path) as f:
                tables[name] = f.read()
    new, done = replace_markers(text, tables)
    if new != text:
        with open(readme + ".tmp", "w") as f:
            f.write(new)
        os.replace(readme + ".tmp", readme)
    return done


def run_one(name: str, script: str, args: list[str], timeout: float) -> dict:
    """Runs one benchmark script in its own process group; stdout -> bench/results/<name>.md
    (command and date on top), stderr -> runs/bench_logs/<name>.log."""
    os.makedirs(RESULTS, exist_ok=True)
    os.makedirs(LOGS, exist_ok=True)
    # `python -m bench.<name>` from the repository root (bench/ is a namespace package)
    module = _module(script)
    cmd = [sys.executable, "-m", module, *args]
    shown = "python " + " ".join(shlex.quote(x) for x in ["-m", module, *args])
    out_path, log_path = os.path.join(RESULTS, f"{name}.md"), os.path.join(LOGS, f"{name}.log")
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.perf_counter()
    with open(out_path + ".tmp", "w") as out, open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=log, start_new_session=True)
        status = "ok"
        try:
            rc = proc.wait(timeout=timeout)
            if rc != 0:
                status = f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timeout ({timeout:.0f} s)"
            _stop(proc)
        except KeyboardInterrupt:
            _stop(proc)
            raise
    secs = time.perf_counter() - t0
    with open(out_path + ".tmp") as f:
        body = f.read()
    os.remove(out_path + ".tmp")
    head = f"`{shown}` ({started}, {secs:.0f} s, {status})\n\n"
    if status != "ok":
        with open(log_path) as f:
            tail = f.read()[-3000:]
        body += f"\n\n{status}; stderr tail:\n\n```\n{tail}\n```\n"
    with open(out_path, "w") as f:
        f.write(head + body.rstrip("\n") + "\n")
    return {"name": name, "status": status, "seconds": secs, "command": shown}


def _module(script: str) -> str:
    return os.path.splitext(script)[0].replace("/", ".")


def _stop(proc) -> None:
    """SIGTERM to the benchmark's own process group, SIGKILL if it is still there after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def summary_table(results: list[dict]) -> str:
    lines = ["| benchmark | status | wall s | command |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.0f} | `{r['command']}` |")
    total = sum(r["seconds"] for r in results)
    lines.append(f"| total | {sum(r['status'] == 'ok' for r in results)} of {len(results)} ok | "
                 f"{total:.0f} | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="reduced budgets (the default)")
    mode.add_argument("--full", action="store_true", help="each script's documented budget")
    p.add_argument("--only", default="", help="comma-separated names: " + ",".join(BENCHMARKS))
    p.add_argument("--skip", default="", help="comma-separated names to leave out")
    p.add_argument("--timeout_scale", type=float, default=1.0, help="multiplies every time limit")
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    p.add_argument("--no_readme", action="store_true", help="leave README.md alone")
    p.add_argument("--readme_only", action="store_true",
                   help="run nothing; refresh README.md's marked tables from bench/results/")
    p.add_argument("--dry_run", action="store_true", help="print the commands only")
    a = p.parse_args(argv)
    if a.readme_only:
        done = update_readme(a.readme)
        print(f"README tables refreshed: {', '.join(done) or '(none)'}")
        return 0
    names = [n for n in (a.only.split(",") if a.only else BENCHMARKS) if n]
    unknown = [n for n in names + [s for s in a.skip.split(",") if s] if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    names = [n for n in names if n not in a.skip.split(",")]
    t_start = time.time()
    results = []
    for name in names:
        script, quick, full, t_quick, t_full = BENCHMARKS[name]
        args, timeout = (full, t_full) if a.full else (quick, t_quick)
        timeout *= a.timeout_scale
        if a.dry_run:
            print(f"{name}: python -m {_module(script)} {' '.join(args)}  (limit {timeout:.0f} s)")
            continue
        print(f"== {name}: python -m {_module(script)} {' '.join(args)} (limit {timeout:.0f} s)",
              flush=True)
        r = run_one(name, script, args, timeout)
        results.append(r)
        with open(os.path.join(RESULTS, f"{name}.md")) as f:
            print(f.read(), flush=True)
        print(f"== {name}: {r['status']} in {r['seconds']:.0f} s", flush=True)
    if a.dry_run:
        return 0
    table = summary_table(results)
    print("\n" + table)
    mode_name = "full" if a.full else "quick"
    if set(names) == set(BENCHMARKS):  # all.md records the last run of every benchmark
        with open(os.path.join(RESULTS, "all.md"), "w") as f:
            f.write(f"`python bench/all.py --{mode_name}` "
                    f"({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC})\n\n"
                    + table + "\n")
    else:
        print("bench/results/all.md left as it is: it records the last run of every benchmark")
    if not a.no_readme and os.path.exists(a.readme):
        failed = {r["name"] for r in results if r["status"] != "ok"}
        done = update_readme(a.readme, since=t_start, failed=failed)
        print(f"README tables refreshed: {', '.join(done) or '(none)'}"
              + (f" (not from the failed: {', '.join(sorted(failed))})" if failed else ""))
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
