"""``train(cfg)``: a short training loop over a task, with hooks.

Step-based: the learning-rate schedule, evaluation, logging and checkpoints all count optimiser
steps. :class:`Trainer` builds the run (data, model, optimiser, schedule) and runs the loop;
what differs between kinds of model is the :class:`~denseseg.engine.tasks.Task`'s, and what
happens around the steps (logging, PreciseBN, evaluation, checkpoints, your own) is in hooks
(:mod:`denseseg.engine.hooks`). Everything a resume needs (model, optimiser, scheduler, grad
scaler, step, epoch, sampler position, RNG states, resolved config) goes into each checkpoint,
so ``resume=True`` continues exactly where a run stopped. Ctrl-C or SIGTERM stops after the
current step and saves a consistent ``last.pt`` (:mod:`denseseg.engine.stop`); the run folder
is locked against a second training (:mod:`denseseg.engine.run_folder`).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from denseseg.checkpoint import load_model_weights
from denseseg.checkpoint.serialization import (
    FORMAT_VERSION,
    atomic_save,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    set_rng_state,
)
from denseseg.config import Config, save_config
from denseseg.engine.hooks import HookBase, default_hooks
from denseseg.engine.optim import backward_and_step, build_optimizer, lr_factor
from denseseg.engine.run_folder import RunLock, make_run_folder
from denseseg.engine.stop import StopOnSignal
from denseseg.engine.tasks import task_for
from denseseg.engine.training_data import (
    read_training_split,
    read_validation_split,
    train_loader,
    training_pipeline,
)
from denseseg.errors import CheckpointError, ConfigError, Interrupted
from denseseg.inference.build import build_predictor
from denseseg.inference.segmenter import resolve_device
from denseseg.models import create_model

log = logging.getLogger("denseseg")

__all__ = ["Trainer", "build_model_for", "seed_everything", "train"]


def train(
    cfg: Config, resume: bool | str | Path = False, hooks: Sequence[HookBase] = ()
) -> dict[str, Any]:
    """Train a model as the recipe ``cfg`` says.

    Args:
        cfg: the resolved recipe (see :mod:`denseseg.config`).
        resume: False to start fresh (refused if the output folder already holds ``last.pt``),
            True to continue from ``<out_dir>/last.pt``, or the path of a checkpoint.
        hooks: your own :class:`~denseseg.engine.hooks.HookBase` objects, called after the
            built-in ones.

    Returns:
        ``{"out_dir", "step", "best_mIoU", "metrics" (last evaluation), "checkpoint"}``;
        instance models give ``best_segm_AP`` (COCO mask AP) instead of ``best_mIoU``.
    """
    out = make_run_folder(cfg.train.out_dir)
    with RunLock(out):  # before any data is read: a second run on this folder stops here
        for stale in remove_stale_temporaries(out):
            log.info("removed %s, left by a save that was killed", stale.name)
        trainer = Trainer(cfg, out, _resume_path(out, resume))
        trainer.hooks += list(hooks)
        return trainer.run()


class Trainer:
    """One training run: built from a recipe, run by :meth:`run`.

    Attributes:
        cfg, out, device: the recipe, the run folder, the device.
        task: what the kind of model does differently (:mod:`denseseg.engine.tasks`).
        data, val: the training data (:class:`~denseseg.engine.training_data.TrainingData`) and
            the raw validation split (or None).
        model, optimizer, scheduler, scaler: the usual.
        predictor: the Segmenter (or InstanceSegmenter) evaluations run through.
        state: ``step``, ``epoch``, ``pos`` (samples into the epoch), ``best_<metric>``,
            ``metrics`` (of the last evaluation): what a checkpoint stores besides the parts.
        loss: the last step's loss; hooks: called around the steps, in order.
    """

    def __init__(self, cfg: Config, out: Path, ckpt_path: Path | None = None) -> None:
        tc, dc = cfg.train, cfg.data
        self.cfg, self.out, self.resumed = cfg, out, ckpt_path is not None
        seed_everything(tc.seed, tc.deterministic)
        self.device = resolve_device(tc.device)
        raw, self.val = read_training_split(dc), read_validation_split(dc)
        self._build_model(raw)
        self.task = task_for(self.model)
        self.task.check(cfg, raw)
        self.data = training_pipeline(dc, raw, normalise=not self.task.normalises_inside)
        self.task.prepare(cfg, self.data, self.model_kwargs, self.device)
        self._build_optimisation()
        self.meta = self._meta()
        best = f"best_{self.task.best_metric}"
        self.state: dict[str, Any] = {"step": 0, "epoch": 0, "pos": 0, best: -1.0, "metrics": None}
        if ckpt_path is not None:
            parts = {n: getattr(self, n) for n in ("model", "optimizer", "scheduler", "scaler")}
            _restore(ckpt_path, self.device, cfg.model.name, self.model_kwargs, parts, self.state)
            log.info("resumed from %s at step %d", ckpt_path, self.state["step"])
        self.predictor = build_predictor(self.model, self.meta, self.device)
        self.batch_size = min(dc.batch_size, len(self.data.dataset))
        self.saved_step = self.step if ckpt_path == out / "last.pt" else None
        self.loss, self.stopped, self.stop = float("nan"), False, StopOnSignal()
        self.hooks: list[HookBase] = default_hooks(self)

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        """Train to ``train.max_steps``; returns the summary :func:`train` documents."""
        self._call("before_train")
        try:
            with self.stop:
                self._loop()
        except KeyboardInterrupt:  # a second signal: stop at once, the step may be half done
            raise Interrupted(
                f"stopped during step {self.step + 1} without saving; "
                + _last_saved(self.out, self.saved_step),
                self.stop.signum or 2,
            ) from None
        finally:
            self._call("after_train")
        if self.stopped:
            name, path = self.stop.name, self.out / "last.pt"
            raise Interrupted(
                f"{name} at step {self.step}: saved {path}; continue with --resume",
                self.stop.signum,
            )
        best = f"best_{self.task.best_metric}"
        return {
            "out_dir": str(self.out),
            "step": self.step,
            best: self.state[best],
            "metrics": self.state["metrics"],
            "checkpoint": str(self.out / "last.pt"),
        }

    def _loop(self) -> None:
        max_steps, state = self.cfg.train.max_steps, self.state
        self.model.train()
        while self.step < max_steps and not self.stop.signum:
            for batch in self._batches():
                if self.stop.signum:  # arrived while the batch was being read: no step begun
                    break
                self.run_step(batch)
                self._call("after_step")
                if self.step >= max_steps or self.stop.signum:
                    break
            else:
                state["epoch"], state["pos"] = state["epoch"] + 1, 0
        self.stopped = bool(self.stop.signum) and self.step < max_steps

    def run_step(self, batch: Any) -> None:
        """One optimiser step on ``batch``: the task's loss (under autocast), backward,
        clipping, the update, the schedule; stops on a NaN loss."""
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            loss = self.task.loss(self.model, batch, self.device)
        grad_clip = self.cfg.optim.grad_clip
        self.loss = backward_and_step(loss, self.model, self.optimizer, self.scaler, grad_clip)
        self.scheduler.step()
        self.state["step"] += 1
        self.state["pos"] += self.batch_size

    def evaluate(self) -> dict[str, Any] | None:
        """Evaluate on the validation split (between ``before_eval`` and ``after_eval``)."""
        if self.val is None:
            return None
        self._call("before_eval")
        metrics = self.task.evaluate(self.predictor, self.val, self.cfg)
        self.model.train()
        self.state["metrics"] = metrics
        self._call("after_eval", metrics)
        return metrics

    def save(self, kind: str) -> Path:
        """Write ``<out>/<kind>.pt`` (``last`` or ``best``) atomically, with ``config.yaml``
        beside it (not at the start: a resume that fails while reading its first batches must
        leave the run's files as they were)."""
        save_config(self.cfg, self.out / "config.yaml")
        path = self.out / f"{kind}.pt"
        atomic_save(self.checkpoint(), path)
        if kind == "last":
            self.saved_step = self.step
        return path

    def checkpoint(self) -> dict[str, Any]:
        """Everything a resume and a predictor need, as plain data and tensors."""
        return {
            "format_version": FORMAT_VERSION,
            **self.meta,
            **self.state,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
        }

    @property
    def step(self) -> int:
        return self.state["step"]

    @property
    def epoch(self) -> int:
        return self.state["epoch"]

    # ------------------------------------------------------------------ building the run
    def _batches(self):
        dc = self.cfg.data
        return train_loader(
            self.data.dataset,
            self.batch_size,
            seed=self.cfg.train.seed,
            epoch=self.state["epoch"],
            pos=self.state["pos"],
            num_workers=dc.num_workers,
            collate=self.task.collate,
            pin_memory=self.device.type == "cuda",
        )

    def _call(self, event: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self, *args)

    def _build_model(self, raw: Any) -> None:
        cfg = self.cfg
        self.model, self.model_kwargs = build_model_for(cfg, raw.num_classes, raw.in_channels)
        if cfg.model.weights:
            load_model_weights(self.model, cfg.model.weights)  # logs what it skipped
        if cfg.optim.freeze_backbone:
            _freeze_backbone(self.model)
        self.model.to(self.device)

    def _build_optimisation(self) -> None:
        oc, sc, tc = self.cfg.optim, self.cfg.schedule, self.cfg.train
        self.optimizer = build_optimizer(
            self.model,
            oc.name,
            lr=oc.lr,
            weight_decay=oc.weight_decay,
            momentum=oc.momentum,
            nesterov=oc.nesterov,
            betas=tuple(oc.betas),
            backbone_lr_mult=oc.backbone_lr_mult,
            no_decay_norm_bias=oc.no_decay_norm_bias,
        )
        schedule = {
            "name": sc.name,
            "power": sc.power,
            "warmup_steps": sc.warmup_steps,
            "warmup_factor": sc.warmup_factor,
            "min_ratio": sc.min_lr / oc.lr if oc.lr > 0 else 0.0,
            "milestones": sc.milestones,
            "gamma": sc.gamma,
        }
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, tc.max_steps, **schedule)
        )
        self.amp = tc.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)

    def _meta(self) -> dict[str, Any]:
        raw, data = self.data.raw, self.data
        return {
            "model_name": self.cfg.model.name,
            "model_kwargs": self.model_kwargs,
            "class_names": list(raw.classes),
            "palette": [list(p) for p in raw.palette],
            "mean": data.mean,
            "std": data.std,
            "in_channels": raw.in_channels,
            "num_classes": raw.num_classes,
            "ignore_index": raw.ignore_index,
            **self.task.meta(data, self.cfg),
        }


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; with ``deterministic`` also force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def build_model_for(cfg: Config, num_classes: int, in_channels: int) -> tuple[nn.Module, dict]:
    """Create the recipe's model; ``num_classes``/``in_channels`` default to the dataset's."""
    kwargs = dict(cfg.model.kwargs)
    kwargs.setdefault("num_classes", num_classes)
    kwargs.setdefault("in_channels", in_channels)
    if kwargs["num_classes"] == 1 and num_classes != 2:
        raise ConfigError(
            "model.kwargs.num_classes=1 (binary) needs a dataset with 2 classes, "
            f"it has {num_classes}"
        )
    if kwargs["num_classes"] not in (1, num_classes):
        raise ConfigError(
            f"model.kwargs.num_classes={kwargs['num_classes']} but the dataset has {num_classes} "
            "classes; drop the option to use the dataset's"
        )
    model = create_model(cfg.model.name, **kwargs)
    # Weight sources initialise training only: the checkpoint carries the trained weights, and
    # rebuilding the model from it must not fetch (or need) the initial files again.
    saved = {k: v for k, v in kwargs.items() if k not in ("weights", "backbone_weights")}
    return model, saved


def _freeze_backbone(model: nn.Module) -> None:
    backbone = getattr(model, "backbone", None) or getattr(model, "encoder", None)
    if backbone is None:
        raise ConfigError(
            f"optim.freeze_backbone=true but {type(model).__name__} has no backbone to freeze"
        )
    for p in backbone.parameters():
        p.requires_grad_(False)


def _last_saved(out: Path, step: int | None) -> str:
    if step is None:
        return f"no checkpoint was written yet in {out}"
    return f"{out / 'last.pt'} holds step {step}; continue with --resume"


def _restore(
    path: Path,
    device: torch.device,
    model_name: str,
    model_kwargs: dict,
    parts: dict[str, Any],
    state: dict[str, Any],
) -> None:
    """Load a run's state from ``path`` into ``parts`` (model, optimiser, ...) and ``state``;
    anything that does not fit this recipe ends in one line naming the file."""
    ckpt = load_checkpoint(path, map_location=device)
    if ckpt.get("model_name") != model_name:
        raise CheckpointError(
            f"{path} holds model {ckpt.get('model_name')!r}, the recipe asks for "
            f"{model_name!r}; resume with the same recipe"
        )
    saved = ckpt.get("model_kwargs")
    if isinstance(saved, dict) and saved != model_kwargs:
        keys = sorted(k for k in {*saved, *model_kwargs} if saved.get(k) != model_kwargs.get(k))
        raise CheckpointError(
            f"{path} was trained with other model options ({', '.join(keys)}: "
            f"{[saved.get(k) for k in keys]} there, {[model_kwargs.get(k) for k in keys]} now); "
            "resume with the recipe's model.kwargs unchanged"
        )
    missing = [k for k in (*parts, "rng", *state) if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path} cannot resume a run: it lacks {', '.join(missing)}; start a new run from "
            f"its weights with model.weights={path}"
        )
    for name, part in parts.items():
        try:
            part.load_state_dict(ckpt[name])
        except Exception as exc:  # each torch class raises its own type for a misfit state
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(
                f"{path}: its {name} state does not fit this run ({first[:200]})"
            ) from None
    try:
        set_rng_state(ckpt["rng"])
    except Exception as exc:
        raise CheckpointError(
            f"{path}: its random-number-generator state is damaged ({type(exc).__name__}); "
            "resume from another checkpoint (step_*.pt)"
        ) from None
    state.update({k: ckpt[k] for k in state})
    if not all(isinstance(state[k], int) and state[k] >= 0 for k in ("step", "epoch", "pos")):
        raise CheckpointError(f"{path}: its step, epoch or sampler position is damaged")


def _resume_path(out: Path, resume: bool | str | Path) -> Path | None:
    if resume is False or resume is None:
        if (out / "last.pt").exists():
            raise ConfigError(
                f"{out} already holds a run (last.pt); pass --resume to continue it or set "
                "train.out_dir to a new folder"
            )
        return None
    path = out / "last.pt" if resume is True else Path(resume)
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {path} not found")
    return path
