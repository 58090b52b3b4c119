"""peft_sparse's tuners, each in PEFT's layout: ``<method>/{config,layer,model}.py``."""

from .bitfit import BitFitConfig, BitFitLayer, BitFitModel
from .dps import DPSConfig, DPSLayer, DPSModel
from .layerselect import LayerSelectConfig, LayerSelectLayer, LayerSelectModel
from .learner import LearnerConfig, LearnerLayer, LearnerModel
from .sparsemask import SparseMaskConfig, SparseMaskLayer, SparseMaskModel

#: method name -> (config class, tuner model class); registry.py registers each with PEFT.
METHODS = {
    "bitfit": (BitFitConfig, BitFitModel),
    "layerselect": (LayerSelectConfig, LayerSelectModel),
    "sparsemask": (SparseMaskConfig, SparseMaskModel),
    "dps": (DPSConfig, DPSModel),
    "learner": (LearnerConfig, LearnerModel),
}
METHOD_NAMES = tuple(METHODS)

__all__ = [
    "METHODS",
    "METHOD_NAMES",
    "BitFitConfig",
    "BitFitLayer",
    "BitFitModel",
    "DPSConfig",
    "DPSLayer",
    "DPSModel",
    "LayerSelectConfig",
    "LayerSelectLayer",
    "LayerSelectModel",
    "LearnerConfig",
    "LearnerLayer",
    "LearnerModel",
    "SparseMaskConfig",
    "SparseMaskLayer",
    "SparseMaskModel",
]
