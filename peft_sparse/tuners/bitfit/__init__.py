from .config import BitFitConfig
from .layer import BitFitLayer
from .model import BitFitModel

__all__ = ["BitFitConfig", "BitFitLayer", "BitFitModel"]
