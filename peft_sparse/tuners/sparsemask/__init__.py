from .config import SparseMaskConfig
from .layer import SparseMaskLayer
from .model import SparseMaskModel

__all__ = ["SparseMaskConfig", "SparseMaskLayer", "SparseMaskModel"]
