"""The package layout: ``peft_sparse.kernels`` is installed from ``kernels/sparse_delta/``, and the repository's
root ``kernels/`` folder is no package, so that Hugging Face's ``kernels`` (which transformers and bitsandbytes
import) always wins, even for a Python started in the repository root."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_root_kernels_folder_is_not_a_package():
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "kernels" / "sparse_delta" / "__init__.py").exists()
    # test_registry.py starts a Python in the repository root that imports transformers and peft_sparse.


@pytest.mark.slow
def test_wheel_installs_the_kernels_as_a_subpackage(tmp_path):
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ there
    for part in ("peft_sparse", "kernels"):
        shutil.copytree(ROOT / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, source / part)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("peft_sparse-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "peft_sparse/kernels/__init__.py" in names and "peft_sparse/kernels/function.py" in names
    assert not any(n.startswith("kernels/") for n in names)
