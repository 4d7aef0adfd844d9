"""Executes notebooks/vlm.ipynb end to end (QUICK mode: a few steps per stage) in a kernel running this venv's Python."""

import os
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from tests.test_notebook import NOTEBOOK as QUICKSTART  # noqa: E402
from tests.test_notebook import _kernel_manager, _text_outputs  # noqa: E402

NOTEBOOK = QUICKSTART.parent / "vlm.ipynb"


@pytest.mark.slow  # three compiled training stages and the evaluation: ~1 CPU-min, past the fast suite's budget
def test_vlm_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("LUMEN_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
    monkeypatch.setenv("XLA_FLAGS", flags)
    for name in [k for k in os.environ if k.startswith("COLAB_")]:
        monkeypatch.delenv(name)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, km=_kernel_manager(tmp_path), timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    text = _text_outputs(nb)
    assert "skipped the install step" in text
    assert re.search(r"vision\s+[\d,]+ parameters", text) and "32 image tokens per image (4x8 patches)" in text
    assert len(re.findall(r"gold .* model ", text)) == 3
    assert "PaliGemma: 2 encoder layers, 2 LM layers, 4 image tokens, projector linear" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2
    assert (tmp_path / "runs" / "vlm_notebook_quick" / "results" / "vlm.json").exists()
