"""Executes notebooks/test_time_scaling.ipynb end to end at tiny scale (LUMEN_NOTEBOOK_QUICK=1)."""

import os
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from tests.test_notebook import NOTEBOOK, _kernel_manager, _text_outputs  # noqa: E402

TTS_NOTEBOOK = NOTEBOOK.parent / "test_time_scaling.ipynb"


def test_test_time_scaling_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("LUMEN_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
    monkeypatch.setenv("XLA_FLAGS", flags)
    nb = nbformat.read(TTS_NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, km=_kernel_manager(tmp_path), timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    text = _text_outputs(nb)
    assert len(re.findall(r"^Q .* -> ", text, re.M)) == 6
    loss0, loss1 = map(float, re.search(r"PRM training loss ([0-9.]+) -> ([0-9.]+)", text).groups())
    assert loss1 < loss0, text
    assert re.search(r"PRM held-out: F1 [0-9.na]+", text)
    assert re.search(r"^beam search: answers .* accuracy [0-9.]+, tokens generated \d+, scored \d+", text, re.M)
    assert re.search(r"^weighted BoN: answers", text, re.M)
    assert len(re.findall(r"^(majority|weighted_best_of_n|beam) \{", text, re.M)) == 3
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert (tmp_path / "runs" / "tts_notebook_quick" / "policy" / "metrics.jsonl").exists()
