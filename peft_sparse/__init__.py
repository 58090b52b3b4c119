"""peft_sparse: sparse and selective fine-tuning methods as Hugging Face PEFT tuners.

Importing the package registers its tuners with stock PEFT, so ``get_peft_model``, ``PeftModel.from_pretrained``,
``AutoPeftModel*`` and transformers' ``load_adapter`` accept them. PEFT has no plugin discovery: import
``peft_sparse`` before loading a saved peft_sparse adapter.
"""

__version__ = "0.2.0.dev0"

from peft_sparse.registry import check_peft_version  # noqa: E402

check_peft_version()

from peft_sparse.registry import register_all  # noqa: E402

register_all()

from peft_sparse.callbacks import SparseTrainerCallback  # noqa: E402
from peft_sparse.calibration import calibrate, requires_calibration  # noqa: E402
from peft_sparse.distributed import check_sharding  # noqa: E402
from peft_sparse.tuners import (  # noqa: E402
    BitFitConfig,
    BitFitModel,
    DPSConfig,
    DPSModel,
    LayerSelectConfig,
    LayerSelectModel,
    LearnerConfig,
    LearnerModel,
    SparseMaskConfig,
    SparseMaskModel,
)
from peft_sparse.calibration import CalibrationRequiredError  # noqa: E402
from peft_sparse.serving import hotswap_adapter, hotswap_adapter_from_state_dict  # noqa: E402

__all__ = [
    "BitFitConfig",
    "BitFitModel",
    "CalibrationRequiredError",
    "DPSConfig",
    "DPSModel",
    "LayerSelectConfig",
    "LayerSelectModel",
    "LearnerConfig",
    "LearnerModel",
    "SparseMaskConfig",
    "SparseMaskModel",
    "SparseTrainerCallback",
    "calibrate",
    "check_sharding",
    "hotswap_adapter",
    "hotswap_adapter_from_state_dict",
    "requires_calibration",
]
