"""Re-executes the example notebooks top to bottom with their default parameters and stores them
with their outputs (text and small PNG figures), so they read on a web page without running.

    python examples/execute.py                     # both
    python examples/execute.py attention_zoo.ipynb

Runs from the repository root in a Jupyter kernel of this interpreter (nbclient), one CPU
device. The quickstart trains into its default workdir, runs/quickstart: an existing one would
be resumed (other outputs), so it is refused rather than touched; move it away first.
tests/test_notebooks.py executes them again with small parameters and checks that every cell
stored with a figure still draws one.
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NOTEBOOKS = ("quickstart.ipynb", "attention_zoo.ipynb")


def run(nb, cwd: str, timeout: int) -> None:
    """Executes the notebook `nb` (nbformat) in place, in a kernel of this interpreter (not
    whatever `python3` kernelspec comes first on the path), with one CPU device (a simulated
    device count in XLA_FLAGS, as the test session sets, removed) and inline figures; raises
    on a cell error. tests/test_notebooks.py runs the examples through this too."""
    import nbclient
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    km.kernel_spec.argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    nbclient.NotebookClient(nb, km=km, timeout=timeout, allow_errors=False).execute(
        cwd=cwd, env=env)


def execute(name: str, timeout: int = 1800) -> None:
    import nbformat

    if name == "quickstart.ipynb" and os.path.exists(os.path.join(ROOT, "runs", "quickstart")):
        raise SystemExit("runs/quickstart exists: the quickstart would resume it; move it away "
                         "first (nothing was changed)")
    path = os.path.join(HERE, name)
    nb = nbformat.read(path, as_version=4)
    run(nb, ROOT, timeout)
    for cell in nb.cells:  # no timings or widget state in the stored file
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs
                            if "application/vnd.jupyter.widget-view+json" not in o.get("data", {})]
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, path)
    size = os.path.getsize(path)
    figures = sum("image/png" in o.get("data", {}) for c in nb.cells
                  for o in c.get("outputs", []))
    print(f"{name}: executed, {figures} figures, {size / 1024:.0f} KiB")


def main(argv=None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or NOTEBOOKS
    for name in names:
        if name not in NOTEBOOKS:
            raise SystemExit(f"unknown notebook {name!r}; the examples are {', '.join(NOTEBOOKS)}")
        execute(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
