from .config import LearnerConfig
from .layer import LearnerLayer
from .model import LearnerModel

__all__ = ["LearnerConfig", "LearnerLayer", "LearnerModel"]
