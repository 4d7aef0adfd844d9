"""Executes notebooks/quickstart.ipynb end to end (QUICK mode) in a kernel running this venv's Python."""

import json
import os
import pathlib
import re
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
KERNEL = "lumen-test"


def _kernel_manager(tmp_path: pathlib.Path) -> KernelManager:
    """A kernel pinned to sys.executable: a `python3` kernelspec found on the path may belong to another Python."""
    spec_dir = tmp_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec_dir / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    assert specs.get_kernel_spec(KERNEL).argv[0] == sys.executable
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def _text_outputs(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream" and o.get("name") == "stdout":
                out.append(o["text"])
            elif "text/plain" in o.get("data", {}):
                out.append(o["data"]["text/plain"])
    return "".join(out)


def run_notebook(path: pathlib.Path, tmp_path: pathlib.Path, monkeypatch) -> tuple:
    """Executes a notebook in QUICK mode (LUMEN_NOTEBOOK_QUICK=1) like a user's machine: one CPU device (not
    conftest's 8 simulated ones), no Colab variables, inline figures, runs/ under `tmp_path`.

    Returns (the executed notebook, its stdout and plain-text outputs joined); a failing cell raises
    CellExecutionError with its traceback.
    """
    monkeypatch.setenv("LUMEN_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
    monkeypatch.setenv("XLA_FLAGS", flags)
    for name in [k for k in os.environ if k.startswith("COLAB_")]:
        monkeypatch.delenv(name)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        km=_kernel_manager(tmp_path),
        timeout=600,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's cwd: runs/ lands in tmp_path
    )
    client.execute()
    return nb, _text_outputs(nb)


def has_figure(nb) -> bool:
    """Whether any cell displayed a PNG figure."""
    return any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nb, text = run_notebook(NOTEBOOK, tmp_path, monkeypatch)
    assert "skipped the install step" in text
    graded = re.findall(r"steps ok (\d+)/(\d+), (exact|answer ok|wrong)", text)
    assert len(graded) == 8, text
    assert "graded 8 completions" in text
    assert re.search(r"^greedy ", text, re.M) and re.search(r"^T=0\.8 ", text, re.M)
    assert "exact match" in text  # the accuracy-by-K table
    assert has_figure(nb), "the loss-curve cell displayed no figure"
    assert (tmp_path / "runs" / "notebook_quick" / "metrics.jsonl").exists()
