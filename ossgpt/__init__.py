"""ossgpt: OpenAI's gpt-oss models in plain PyTorch."""

from .checkpoint import CheckpointError, load
from .config import ModelConfig
from .model import Transformer

__all__ = ["CheckpointError", "ModelConfig", "Transformer", "load"]
__version__ = "0.1.0"
