"""Packaging: `setup.cfg` installs packages through `packages = find:`, which skips any folder without __init__.py.

An editable install (`pip install -e .`) hides such a gap because it imports from the source tree; a wheel or
`pip install git+...` (the notebooks' Colab cell) would silently ship without that folder.
"""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("framework", "kernels", "experiments", "configs", "scripts")
# Run as files, never imported: the golden generator runs in a torch venv without JAX or Lumen installed.
NOT_PACKAGES = {ROOT / "scripts" / "golden"}


def test_every_source_folder_is_a_package():
    missing = []
    for top in PACKAGES:
        for folder in [ROOT / top, *(p for p in (ROOT / top).rglob("*") if p.is_dir())]:
            if folder.name == "__pycache__" or folder in NOT_PACKAGES or not any(folder.glob("*.py")):
                continue
            if not (folder / "__init__.py").exists():
                missing.append(str(folder.relative_to(ROOT)))
    assert not missing, f"folders with Python files but no __init__.py (left out of a non-editable install): {missing}"
