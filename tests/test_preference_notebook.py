"""Executes notebooks/preference.ipynb end to end at tiny scale (LUMEN_NOTEBOOK_QUICK=1: ~20 s of CPU)."""

import re

import pytest

pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from tests.test_notebook import NOTEBOOK, has_figure, run_notebook  # noqa: E402

PREF_NOTEBOOK = NOTEBOOK.parent / "preference.ipynb"


def test_preference_notebook_runs(tmp_path, monkeypatch):
    nb, text = run_notebook(PREF_NOTEBOOK, tmp_path, monkeypatch)
    assert len(re.findall(r"^\S.* loss [0-9.]+ +rewards/accuracies", text, re.M)) == 6
    assert "'dropped_identical': 1" in text
    assert re.search(r"exact match: SFT [0-9.]+ -> DPO [0-9.]+", text)
    loss0, loss1 = map(float, re.search(r"loss ([0-9.]+) -> ([0-9.]+)", text).groups())
    assert loss0 == pytest.approx(0.6931, abs=1e-3)  # step 1: the policy is its reference
    assert has_figure(nb)
