"""The :class:`Task` interface the training loop calls."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from denseseg.config import Config
from denseseg.engine.training_data import TrainingData


@dataclass
class EvalReport:
    """How one evaluation is shown: a log line, ``log.csv`` columns, TensorBoard scalars."""

    line: str
    csv: dict[str, str] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)


class Task(ABC):
    """One kind of model in training. Subclasses override what differs.

    Attributes:
        best_metric: the key of :meth:`evaluate`'s result that picks ``best.pt`` (higher wins).
        normalises_inside: the model normalises its 0-1 input itself (no data normalisation).
        collate: the loader's ``collate_fn`` (None: torch's default stacking).
    """

    best_metric: str = "score"
    normalises_inside: bool = False
    collate: Callable | None = None

    def check(self, cfg: Config, raw: Any) -> None:
        """Refuse recipe settings this kind of model cannot use (one ConfigError line)."""
        return None

    def prepare(self, cfg: Config, data: TrainingData, model_kwargs: dict, device: Any) -> None:
        """Build what :meth:`loss` needs (criterion, class weights); may wrap ``data.dataset``."""
        return None

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> Tensor:
        """The loss of one batch (called under autocast)."""

    @abstractmethod
    def evaluate(self, predictor: Any, dataset: Any, cfg: Config) -> dict[str, Any]:
        """Metrics of ``predictor`` on the validation ``dataset`` (raw uint8 items)."""

    @abstractmethod
    def report(self, metrics: dict[str, Any], step: int) -> EvalReport:
        """How an evaluation at ``step`` is logged."""

    def meta(self, data: TrainingData, cfg: Config) -> dict[str, Any]:
        """Checkpoint entries this task's predictor needs besides the model's and the data's."""
        return {}
