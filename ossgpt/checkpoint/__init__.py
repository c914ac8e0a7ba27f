"""Reading and writing gpt-oss checkpoints in the official original/ and Hugging Face layouts."""

from .formats import HF, ORIGINAL
from .load import CheckpointError, load, resolve
from .save import save, write_checkpoint, write_random

__all__ = ["HF", "ORIGINAL", "CheckpointError", "load", "resolve", "save", "write_checkpoint",
           "write_random"]
