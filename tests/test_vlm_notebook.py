"""Executes notebooks/vlm.ipynb end to end (QUICK mode: stage 1 for a few steps) in a kernel running this venv's Python."""

import re

import pytest

pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from tests.test_notebook import NOTEBOOK as QUICKSTART  # noqa: E402
from tests.test_notebook import run_notebook  # noqa: E402

NOTEBOOK = QUICKSTART.parent / "vlm.ipynb"


def test_vlm_notebook_runs(tmp_path, monkeypatch):
    nb, text = run_notebook(NOTEBOOK, tmp_path, monkeypatch)
    assert "skipped the install step" in text
    assert re.search(r"vision\s+[\d,]+ parameters", text) and "32 image tokens per image (4x8 patches)" in text
    assert len(re.findall(r"gold .* model ", text)) == 3
    assert "PaliGemma: 2 encoder layers, 2 LM layers, 4 image tokens, projector linear" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2
    assert (tmp_path / "runs" / "vlm_notebook_quick" / "results" / "vlm.json").exists()
