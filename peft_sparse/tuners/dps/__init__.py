from .config import DPSConfig
from .layer import DPSLayer
from .model import DPSModel

__all__ = ["DPSConfig", "DPSLayer", "DPSModel"]
