from .config import LayerSelectConfig
from .layer import LayerSelectLayer
from .model import LayerSelectModel

__all__ = ["LayerSelectConfig", "LayerSelectLayer", "LayerSelectModel"]
