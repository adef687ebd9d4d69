"""The Python API the notebooks use, and the notebooks themselves.

- load_checkpoint(workdir) gives back the trained model (same logits and eval loss as the
  Trainer's) and its config, with clear errors for a directory that is not a run;
- two Trainers one after the other in one process (what re-running a notebook cell does) train,
  resume and leave no TensorBoard writer threads behind;
- examples/quickstart.ipynb and examples/attention_zoo.ipynb execute top to bottom in a Jupyter
  kernel of this interpreter (nbclient), with small settings injected into their `parameters`
  cell; any cell error fails the test.
"""
from __future__ import annotations

import json
import os
import re
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT

EXAMPLES = os.path.join(REPO_ROOT, "examples")


@jax.jit
def _logits_of(graphdef_and_state, tokens):
    from flax import nnx

    return nnx.merge(*graphdef_and_state)(tokens)[0]


def _logits(model, tokens):
    from flax import nnx

    return _logits_of(nnx.split(model), tokens)


def _writer_threads() -> int:
    return sum(type(t).__name__ == "_EventLoggerThread" and t.is_alive()
               for t in threading.enumerate())


# ----------------------------------------------------------------------------- the Python API
def test_two_trainers_in_one_process_then_load_checkpoint(tiny_config, tmp_path, capsys):
    """A notebook re-running a Trainer cell: the second Trainer (on another mesh) resumes the
    first's checkpoint, and each fit closes its TensorBoard writer, so none are left running.
    Then load_checkpoint(workdir) gives back the final model (the same logits and eval loss as
    the Trainer's) and the config, on one device."""
    from flax import nnx

    from trainer import Trainer, load_checkpoint
    from trainer.config import to_json
    from trainer.data import process_batches
    from trainer.task import get_task

    workdir = str(tmp_path)
    before = _writer_threads()
    config = tiny_config("train.steps=4", "eval.batches=1")
    with Trainer(config, workdir, devices=jax.devices()[:1]) as t:
        first = t.fit(max_steps=2)
    assert first["step"] == 2 and _writer_threads() == before
    # the next one on another mesh (two devices): built afresh, nothing of the first one kept
    with Trainer(config, workdir, devices=jax.devices()[2:4]) as t:
        assert t.mesh.devices.size == 2 and t.mesh.devices.flat[0] == jax.devices()[2]
        assert t.step == 2
        second = t.fit()
        trained = t.model
    assert second["step"] == 4 and _writer_threads() == before
    assert "step 2 -> 4 on mesh {'data': 2" in capsys.readouterr().out
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if "train/loss" in line]
    assert steps == [1, 2, 3, 4]

    model, loaded = load_checkpoint(workdir)
    assert json.loads(to_json(loaded)) == json.loads(to_json(config))
    leaves = jax.tree.leaves(nnx.state(model))
    assert leaves and all(len(x.devices()) == 1 for x in leaves)  # one device, not the mesh
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, 256, jnp.int32)
    np.testing.assert_allclose(_logits(model, tokens), _logits(trained, tokens), rtol=1e-5,
                               atol=1e-5)
    # the same eval loss: the Task's loss on the eval split's first batch
    task = get_task(loaded.task)(loaded)
    batch = {k: jnp.asarray(v) for k, v in
             next(iter(process_batches(task.eval_data(), 4, prefetch=0))).items()}

    @nnx.jit
    def eval_loss(m):
        return task.loss(m, batch)[0]

    trained.eval()
    loss = float(eval_loss(model))
    assert loss == pytest.approx(float(eval_loss(trained)), rel=1e-6)
    assert loss == pytest.approx(second["eval"]["loss"], rel=0.5)  # a real LM loss
    assert load_checkpoint(workdir, step=2)[1].train.steps == 4
    with pytest.raises(ValueError, match=r"no checkpoint of step 3 in .*; it holds steps 2, 4"):
        load_checkpoint(workdir, step=3)


def test_load_checkpoint_errors_name_the_path(tiny_config, tmp_path):
    from trainer import load_checkpoint

    with pytest.raises(FileNotFoundError, match=r"'.*nowhere' does not exist; expected a run"):
        load_checkpoint(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"is not a run directory: expected .*checkpoints"):
        load_checkpoint(str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*checkpoints"):
        load_checkpoint(str(tmp_path))


def test_api_exports():
    import trainer
    from models.lm import generate

    assert trainer.generate is generate
    assert {"Trainer", "load_checkpoint", "generate", "load_config", "base_config"} <= set(
        trainer.__all__)


def test_reporter_uses_a_notebook_bar_only_in_a_kernel(tmp_path, monkeypatch):
    from trainer import logs

    r = logs.Reporter(str(tmp_path), 10, 0)  # pytest's stdout: no TTY, no kernel -> log lines
    assert r.bar is None
    r.close()
    r.close()  # idempotent
    monkeypatch.setattr(logs, "in_notebook", lambda: True)
    r = logs.Reporter(str(tmp_path), 10, 3)
    assert r.bar is not None and r.bar.n == 3
    r.progress(5, {"loss": 1.0})
    assert r.bar.n == 5
    r.close()
    assert r.bar is None and r.writer is None


# ----------------------------------------------------------------------------- the notebooks
QUICKSTART = {"steps": 20, "more_steps": 10, "tokenformer_steps": 6, "new_tokens": 16,
              "eval_batches": 2}
ZOO = {"seq_len": 128, "d_model": 32, "num_heads": 2, "block": 32, "segments": 2}


def run_notebook(name: str, parameters: dict, cwd: str, timeout: int = 300):
    """Executes examples/<name> in a kernel of this interpreter, the `parameters` cell replaced
    by `parameters` (the rest of that cell's assignments kept); raises on a cell error."""
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    import importlib.util

    spec = importlib.util.spec_from_file_location("examples_execute",
                                                  os.path.join(EXAMPLES, "execute.py"))
    execute = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(execute)
    nb = nbformat.read(os.path.join(EXAMPLES, name), as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{name}: expected one cell tagged 'parameters'"
    lines = [line for line in cells[0].source.splitlines()
             if line.split("=")[0].strip() not in parameters]
    cells[0].source = "\n".join(lines + [f"{k} = {v!r}" for k, v in parameters.items()])
    execute.run(nb, cwd, timeout)
    return nb


def _outputs(nb) -> str:
    text = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            text.append(o.get("text", "") if o.get("output_type") == "stream" else
                        json.dumps(o.get("data", {}).get("text/plain", "")))
    return "\n".join(text)


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def _figure_cells(nb) -> list[int]:
    """Indices of the code cells with a figure among their outputs."""
    return [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and any(
        "image/png" in o.get("data", {}) for o in c.get("outputs", []))]


def check_stored_figures(name: str, executed) -> None:
    """The notebook is stored executed (examples/execute.py: outputs and figures, so it reads
    on a web page), and every cell stored with a figure still draws one when run again."""
    import nbformat

    stored = nbformat.read(os.path.join(EXAMPLES, name), as_version=4)
    code = [c for c in stored.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), f"{name}: stored without running it"
    figures = _figure_cells(stored)
    assert figures, f"{name}: stored without its figures (python examples/execute.py)"
    assert set(figures) <= set(_figure_cells(executed)), (
        f"{name}: cells {sorted(set(figures) - set(_figure_cells(executed)))} no longer draw "
        "the figure they are stored with")


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    nb = run_notebook("quickstart.ipynb", dict(QUICKSTART, workdir=str(tmp_path / "qs")),
                      cwd=EXAMPLES)
    out = _outputs(nb)
    assert "starting at step 20" in out
    assert "now at step 30" in out
    growth = re.search(r"loss on a fixed eval batch: ([\d.]+) before growth, ([\d.]+) after", out)
    assert growth and growth[1] == growth[2], out  # the grown TokenFormer's outputs unchanged
    assert _images(nb) >= 1  # the loss curve
    # the progress bar is a notebook widget (or tqdm's text bar), not a wall of log lines
    assert "step 20/20" not in out
    assert (tmp_path / "qs" / "checkpoints").is_dir()  # the workdir given, not examples/runs
    check_stored_figures("quickstart.ipynb", nb)


@pytest.mark.slow
def test_attention_zoo_notebook_runs(tmp_path):
    nb = run_notebook("attention_zoo.ipynb", ZOO, cwd=REPO_ROOT)
    out = _outputs(nb)
    for name in ("softmax", "routing", "HiP", "FlexPrefill", "Landmark", "ACT"):
        assert re.search(rf"^{name}.* distance to the dense softmax map", out, re.M), out
    assert _images(nb) >= 7  # one figure per mechanism, and the gallery
    check_stored_figures("attention_zoo.ipynb", nb)
    # the public API only (attention.layer_config / build / explain): no internals imported
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert not re.search(r"^\s*from attention\.|^\s*import attention\.", source, re.M), source
