"""Executes notebooks/preference.ipynb end to end at tiny scale (LUMEN_NOTEBOOK_QUICK=1: ~20 s of CPU)."""

import os
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from tests.test_notebook import NOTEBOOK, _kernel_manager, _text_outputs  # noqa: E402

PREF_NOTEBOOK = NOTEBOOK.parent / "preference.ipynb"


def test_preference_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("LUMEN_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
    monkeypatch.setenv("XLA_FLAGS", flags)
    nb = nbformat.read(PREF_NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, km=_kernel_manager(tmp_path), timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    text = _text_outputs(nb)
    assert len(re.findall(r"^\S.* loss [0-9.]+ +rewards/accuracies", text, re.M)) == 6
    assert "'dropped_identical': 1" in text
    assert re.search(r"exact match: SFT [0-9.]+ -> DPO [0-9.]+", text)
    loss0, loss1 = map(float, re.search(r"loss ([0-9.]+) -> ([0-9.]+)", text).groups())
    assert loss0 == pytest.approx(0.6931, abs=1e-3)  # step 1: the policy is its reference
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
