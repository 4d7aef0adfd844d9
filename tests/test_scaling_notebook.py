"""Executes notebooks/test_time_scaling.ipynb end to end at tiny scale (LUMEN_NOTEBOOK_QUICK=1)."""

import re

import pytest

pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from tests.test_notebook import NOTEBOOK, has_figure, run_notebook  # noqa: E402

TTS_NOTEBOOK = NOTEBOOK.parent / "test_time_scaling.ipynb"


def test_test_time_scaling_notebook_runs(tmp_path, monkeypatch):
    nb, text = run_notebook(TTS_NOTEBOOK, tmp_path, monkeypatch)
    assert len(re.findall(r"^Q .* -> ", text, re.M)) == 6
    loss0, loss1 = map(float, re.search(r"PRM training loss ([0-9.]+) -> ([0-9.]+)", text).groups())
    assert loss1 < loss0, text
    assert re.search(r"PRM held-out: F1 [0-9.na]+", text)
    assert re.search(r"^beam search: answers .* accuracy [0-9.]+, tokens generated \d+, scored \d+", text, re.M)
    assert re.search(r"^weighted BoN: answers", text, re.M)
    assert len(re.findall(r"^(majority|weighted_best_of_n|beam) \{", text, re.M)) == 3
    assert has_figure(nb)
    assert (tmp_path / "runs" / "tts_notebook_quick" / "policy" / "metrics.jsonl").exists()
