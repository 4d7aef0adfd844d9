"""Executes notebooks/sae.ipynb end to end at tiny scale (LUMEN_NOTEBOOK_QUICK=1), like the quickstart notebook."""

import os
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from tests.test_notebook import NOTEBOOK, _kernel_manager, _text_outputs  # noqa: E402

SAE_NOTEBOOK = NOTEBOOK.parent / "sae.ipynb"


def test_sae_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("LUMEN_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
    monkeypatch.setenv("XLA_FLAGS", flags)
    nb = nbformat.read(SAE_NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, km=_kernel_manager(tmp_path), timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    text = _text_outputs(nb)
    fvu = float(re.search(r"held out: FVU ([0-9.]+)", text).group(1))
    assert fvu < 0.5, text  # a trained SAE explains most of the variance even at this scale
    recovered = float(re.search(r"CE loss recovered (-?[0-9.]+)", text).group(1))
    assert recovered > 0.5, text
    assert len(re.findall(r"^latent \d+: density", text, re.M)) == 4
    run_dir = tmp_path / "runs" / "sae_notebook_quick"
    assert "[[" in text and (run_dir / "report" / "features.html").exists()
    assert (run_dir / "results" / "sae_metrics.json").exists() and (run_dir / "sae_params.safetensors").exists()
    assert "FVU of these 8 tokens" in text
    assert len(re.findall(r"^k=\d+: L0", text, re.M)) == 3
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
