"""What differs between kinds of model in training: one :class:`Task` per kind.

The training loop (:mod:`denseseg.engine.trainer`) is written once; a task says how its batches
are collated and turned into a loss, how it is evaluated and which number picks ``best.pt``, what
is logged and what the checkpoint must carry for its predictor. A new kind of model (panoptic,
say) is a new :class:`Task` subclass registered in :data:`TASKS` under its models' ``task``
attribute; the loop does not change.
"""

from __future__ import annotations

from typing import Any

from denseseg.engine.tasks.base import EvalReport, Task
from denseseg.engine.tasks.instance import InstanceTask
from denseseg.engine.tasks.semantic import SemanticTask

__all__ = ["TASKS", "EvalReport", "InstanceTask", "SemanticTask", "Task", "task_for"]

TASKS: dict[str, type[Task]] = {"semantic": SemanticTask, "instance": InstanceTask}


def task_for(model: Any) -> Task:
    """The task of ``model``: its ``task`` attribute (``"semantic"`` when it has none)."""
    return TASKS[getattr(model, "task", "semantic")]()
