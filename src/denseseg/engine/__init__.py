"""Training, evaluation and checkpoints."""

from denseseg.checkpoint import atomic_save, load_checkpoint
from denseseg.engine.evaluate import evaluate
from denseseg.engine.trainer import train

__all__ = ["atomic_save", "evaluate", "load_checkpoint", "train"]
