"""Executes notebooks/sae.ipynb end to end at tiny scale (LUMEN_NOTEBOOK_QUICK=1), like the quickstart notebook."""

import re

import pytest

pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from tests.test_notebook import NOTEBOOK, has_figure, run_notebook  # noqa: E402

SAE_NOTEBOOK = NOTEBOOK.parent / "sae.ipynb"


def test_sae_notebook_runs(tmp_path, monkeypatch):
    nb, text = run_notebook(SAE_NOTEBOOK, tmp_path, monkeypatch)
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
    assert has_figure(nb)
