"""Metrics to TensorBoard (tensorboardX) and the terminal: a progress bar on a TTY or in a
Jupyter notebook (a widget bar with ipywidgets, else a text bar), plain periodic log lines
otherwise (CI, log files)."""
from __future__ import annotations

import json
import os
import sys

from tensorboardX import SummaryWriter


def in_notebook() -> bool:
    """True inside a Jupyter (IPython) kernel: notebooks, JupyterLab, VS Code, nbclient."""
    if "ipykernel" not in sys.modules or "IPython" not in sys.modules:
        return False
    try:
        shell = sys.modules["IPython"].get_ipython()
    except Exception:  # noqa: BLE001 - an odd IPython: no notebook bar
        return False
    return shell is not None and getattr(shell, "kernel", None) is not None


def _notebook_bar(total: int, initial: int):
    """tqdm's widget bar where ipywidgets is installed, its text bar (on stdout) otherwise."""
    try:
        import ipywidgets  # noqa: F401
        from tqdm.notebook import tqdm
    except ImportError:
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, unit="step", file=sys.stdout)
    return tqdm(total=total, initial=initial, unit="step")


def _fmt(v: float) -> str:
    if v != v:  # nan
        return "nan"
    a = abs(v)
    return f"{v:.3e}" if (a and (a < 1e-3 or a >= 1e5)) else f"{v:.4g}"


class Reporter:
    """Writes scalars to `workdir/tensorboard` (process 0 only) and reports progress."""

    def __init__(self, workdir: str, total_steps: int, start_step: int, *, enabled: bool = True,
                 stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.writer = SummaryWriter(os.path.join(workdir, "tensorboard")) if enabled else None
        # the same scalars as JSON lines, full precision (scripts, tests, quick plots)
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a") if enabled else None
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = None
        if self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, file=self.stream,
                            dynamic_ncols=True, unit="step")
        elif enabled and stream is None and in_notebook():
            self.bar = _notebook_bar(total_steps, start_step)
        self.total = total_steps

    def print(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, file=self.stream, flush=True)

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(prefix + k, float(v), step)
            self.jsonl.write(json.dumps({"step": step, **{prefix + k: float(v)
                                                          for k, v in values.items()}}) + "\n")
            self.jsonl.flush()

    def images(self, step: int, images: dict, prefix: str = "") -> None:
        """{name: uint8 [H, W, 3] or float [H, W, 3] in [0, 1]} to TensorBoard (process 0)."""
        if self.writer is not None:
            for k, img in images.items():
                self.writer.add_image(prefix + k, img, step, dataformats="HWC")

    def tick(self, step: int) -> None:
        """Moves the bar to `step` without new metrics (every step; tqdm rate-limits redraws)."""
        if self.bar is not None and step > self.bar.n:
            self.bar.update(step - self.bar.n)

    def progress(self, step: int, values: dict[str, float], keys=("loss", "tokens/s", "mfu")) -> None:
        """Moves the bar to `step` (or prints a log line when not on a TTY)."""
        if not self.enabled:
            return
        shown = {k.removeprefix("perf/"): v for k, v in values.items()}
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k: _fmt(v) for k, v in shown.items() if k in keys or k.endswith("/s")},
                                 refresh=True)
        else:
            items = " ".join(f"{k}={_fmt(v)}" for k, v in shown.items())
            self.print(f"step {step}/{self.total} {items}")

    def close(self) -> None:
        """Closes the bar, the TensorBoard writer (its thread) and metrics.jsonl; idempotent."""
        bar, writer, jsonl = self.bar, self.writer, self.jsonl
        self.bar = self.writer = self.jsonl = None
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.flush()
            writer.close()
        if jsonl is not None:
            jsonl.close()
