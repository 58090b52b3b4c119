import importlib
import importlib.machinery
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import peft_sparse
from peft_sparse import registry

ROOT = Path(__file__).resolve().parents[1]


def test_import_registers_tuners_with_stock_peft():
    assert registry.registered_methods() == {
        "bitfit": "bitfit_", "layerselect": "layerselect_", "sparsemask": "sparsemask_", "dps": "dps_",
        "learner": "learner_",
    }
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.BITFIT] is peft_sparse.BitFitConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LAYERSELECT] is peft_sparse.LayerSelectModel
    # The new members behave like PEFT's own: lookup by value, iteration, .value used by transformers.
    assert PeftType("BITFIT") is PeftType.BITFIT
    assert PeftType.LAYERSELECT in list(PeftType)
    assert PeftType.BITFIT.value.lower() == "bitfit"


def test_registration_is_idempotent_on_reimport():
    n_members = len(PeftType)
    importlib.reload(registry)
    registry.register_all()
    importlib.reload(peft_sparse)
    assert len(PeftType) == n_members
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.BITFIT].__name__ == "BitFitConfig"


def test_untested_peft_version_is_refused_with_a_clear_message():
    with pytest.raises(ImportError, match=r"peft_sparse supports peft>=0.21.0,<0.22.0, but peft 0.30.1"):
        registry.check_peft_version("0.30.1")
    registry.check_peft_version("0.21.2")


def test_installed_version_is_the_package_version():
    """pyproject.toml takes its version from ``peft_sparse.__version__`` (``dynamic``), the one place it is written:
    the installed metadata says what the code says (after ``pip install -e .``)."""
    assert importlib.metadata.version("peft_sparse") == peft_sparse.__version__


def test_saved_config_loads_through_peft(tmp_path):
    cfg = peft_sparse.LayerSelectConfig(layers=[2, 0], task_type="SEQ_CLS")
    cfg.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, peft_sparse.LayerSelectConfig)
    assert loaded.layers == [0, 2] and loaded.peft_type is PeftType.LAYERSELECT


def test_python_started_in_the_repository_root_imports_transformers_and_peft_sparse():
    """``python -c``, ``python -m`` and a REPL put their working directory first on sys.path. Started in the
    repository root, the root's ``kernels/`` folder must not stand in for Hugging Face's ``kernels`` package, which
    transformers and bitsandbytes import: the Triton kernels are the subpackage ``peft_sparse.kernels`` only."""
    result = subprocess.run([sys.executable, "-c", "import transformers, peft_sparse, peft_sparse.kernels"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("folder", ["benchmarks", "examples", "tests"])
def test_no_script_folder_shadows_an_installed_module(folder):
    """A script puts its own folder first on sys.path, so a module there named like an installed one replaces it
    for every script of the folder: ``benchmarks/kernels.py`` did, for Hugging Face's ``kernels`` that transformers
    (>= 5.25) imports. (The root's ``kernels/`` folder is never on sys.path when the tests run as README says.)"""
    ours = {(ROOT / name).resolve() for name in ("", "benchmarks", "examples", "tests")}
    installed_path = [entry for entry in sys.path if Path(entry or ".").resolve() not in ours]
    names = [path.stem for path in (ROOT / folder).glob("*.py")]
    names += [path.parent.name for path in (ROOT / folder).glob("*/__init__.py")]
    shadowed = {name: str(spec.origin) for name in names
                if (spec := importlib.machinery.PathFinder.find_spec(name, installed_path)) is not None}
    assert not shadowed, f"{folder}/ has modules named like installed ones: {shadowed}"
    assert set(names) & set(sys.builtin_module_names) == set()
