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

A step may run under autocast (``train.precision``, :mod:`denseseg.engine.precision`), on
channels-last weights and inputs (``train.channels_last``), through ``torch.compile``
(``train.compile``), sum the gradients of ``train.accumulate`` batches, and fold the new weights
into a moving average (``train.ema``, :mod:`denseseg.engine.ema`) that is evaluated and saved
beside them.

Under ``torchrun`` (:mod:`denseseg.engine.distributed`) every process runs this loop on its
share of each global batch, through DistributedDataParallel; rank 0 alone locks the run folder,
logs, prints and saves, and the stop flag of a signal is agreed after each step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
from collections.abc import Iterator, Sequence
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
from denseseg.engine import distributed as dist
from denseseg.engine.ema import WeightEMA
from denseseg.engine.hooks import HookBase, default_hooks
from denseseg.engine.optim import build_optimizer, finite, lr_factor, optimizer_step
from denseseg.engine.precision import resolve_precision
from denseseg.engine.run_folder import LOCK_NAME, RunLock, make_run_folder
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


RUN_FILES = ("best.pt", "last.pt", "log.csv", "curves.png", "config.yaml", "tb")
"""The files of a run folder that matter, in the order ``denseseg train`` lists them."""


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
    with dist.process_group(resolve_device(cfg.train.device)), dist.quiet_unless_main():
        with _locked_run_folder(cfg.train.out_dir) as out:
            trainer = Trainer(cfg, out, _resume_path(out, resume))
            trainer.hooks += list(hooks)
            return trainer.run()


@contextlib.contextmanager
def _locked_run_folder(out_dir: str):
    """The run folder, locked (before any data is read: a second run on it stops here) and
    cleaned of a killed save's temporaries; by rank 0 alone, the other ranks wait for it."""
    if not dist.is_main():
        dist.barrier()
        yield Path(out_dir)
        return
    created = not Path(out_dir).exists()
    locked_before = (Path(out_dir) / LOCK_NAME).exists()
    out = make_run_folder(out_dir)
    try:
        with RunLock(out):
            for stale in remove_stale_temporaries(out):
                log.info("removed %s, left by a save that was killed", stale.name)
            dist.barrier()
            yield out
    except BaseException:
        if not locked_before:  # a run that failed before writing anything leaves no trace
            _remove_if_empty(out, created)
        raise


def _remove_if_empty(out: Path, folder_too: bool) -> None:
    with contextlib.suppress(OSError):
        if {p.name for p in out.iterdir()} <= {LOCK_NAME}:
            (out / LOCK_NAME).unlink(missing_ok=True)
            if folder_too:
                out.rmdir()


class _LoaderStopped(Exception):
    """The loader's workers ended under a stop signal before the next batch was read."""


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
        self.device = dist.local_device(resolve_device(tc.device))
        self.rank, self.world = dist.rank(), dist.world_size()
        raw, self.val = read_training_split(dc), read_validation_split(dc)
        self._build_model(raw)
        self.task = task_for(self.model)
        self.task.check(cfg, raw)
        self.data = training_pipeline(dc, raw, normalise=not self.task.normalises_inside)
        self.accumulate = cfg.train.accumulate
        n_train = len(self.data.dataset)
        self.batch_size = _per_process_batch(dc.batch_size, n_train, self.world, self.accumulate)
        self.task.prepare(cfg, self.data, self.model_kwargs, self.device)
        self._build_optimisation()
        self.meta = self._meta()
        best = f"best_{self.task.best_metric}"
        self.state: dict[str, Any] = {"step": 0, "epoch": 0, "pos": 0, best: -1.0, "metrics": None}
        self.ema = WeightEMA(self.model, cfg.train.ema) if cfg.train.ema else None
        if ckpt_path is not None:
            parts = {n: getattr(self, n) for n in ("model", "optimizer", "scheduler", "scaler")}
            if self.ema is not None:
                parts["ema"] = self.ema
            sharding = (self.batch_size, self.world, self.accumulate)
            _restore(
                ckpt_path,
                self.device,
                cfg.model.name,
                self.model_kwargs,
                parts,
                self.state,
                sharding,
            )
            log.info("resumed from %s at step %d", ckpt_path, self.state["step"])
        self.predictor = build_predictor(self.model, self.meta, self.device)
        self.ema_predictor = (
            build_predictor(self.ema.module, self.meta, self.device) if self.ema else None
        )
        self.train_model = self._parallel_model()
        self.agreed_signum = 0  # the stop signal all ranks agreed on after the last step
        self.saved_step = self.step if ckpt_path == out / "last.pt" else None
        self.loss, self.stopped, self.stop = float("nan"), False, StopOnSignal()
        self.hooks: list[HookBase] = default_hooks(self)
        self.model.train()  # the predictor put it in eval mode; run_step may come first

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
            signum, path = self._stop_signum(), self.out / "last.pt"
            raise Interrupted(
                f"{signal.Signals(signum).name} at step {self.step}: saved {path}; continue "
                "with --resume",
                signum,
            )
        best = f"best_{self.task.best_metric}"
        self._draw_curves()
        return {
            "out_dir": str(self.out),
            "step": self.step,
            best: self.state[best],
            "metrics": self.state["metrics"],
            "checkpoint": str(self.out / "last.pt"),
            "files": [p.name for p in map(self.out.joinpath, RUN_FILES) if p.exists()],
        }

    def _draw_curves(self) -> None:
        """``curves.png``: the loss and the validation metric of ``log.csv`` as a picture."""
        csv = self.out / "log.csv"
        if not dist.is_main() or not csv.is_file():
            return
        from denseseg.viz import plot_training_curves  # matplotlib: imported when needed

        try:
            plot_training_curves({self.out.name: csv}, self.out / "curves.png")
        except (OSError, ValueError) as exc:  # a picture is not worth failing a finished run
            log.warning("curves.png not drawn: %s", exc)

    def _loop(self) -> None:
        max_steps, state = self.cfg.train.max_steps, self.state
        self.model.train()
        while self.step < max_steps and not self._stop_signum():
            try:
                for batches in self._groups():
                    if self._stop_signum():  # came while a batch was being read: no step begun
                        break
                    self.run_step(*batches)
                    self._call("after_step")
                    if self.step >= max_steps or self._stop_signum():
                        break
                else:
                    state["epoch"], state["pos"] = state["epoch"] + 1, 0
            except _LoaderStopped:
                break
        self.stopped = bool(self._stop_signum()) and self.step < max_steps

    def _stop_signum(self) -> int:
        """The signal that stops training (0: none). With several processes, the one agreed
        on after the last step, so that every rank stops after the same step."""
        return (self.stop.signum or 0) if self.world == 1 else self.agreed_signum

    def _agree(self) -> None:
        """Several processes: the loss of the global batch (the mean of the ranks'), and the
        stop flag (any rank's signal stops them all after this step)."""
        if self.world == 1:
            return
        loss = torch.tensor([self.loss], dtype=torch.float64, device=self.device)
        self.loss = float(dist.all_reduce_sum(loss)) / self.world
        signum = torch.tensor([self.stop.signum or 0], device=self.device)
        self.agreed_signum = int(dist.all_reduce_max(signum))

    def run_step(self, *batches: Any) -> None:
        """One optimiser step over ``batches`` (one, or ``train.accumulate`` of them, whose
        gradients add up): the task's loss under autocast, backward, clipping, the update, the
        schedule, the EMA; stops on a NaN loss."""
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for i, batch in enumerate(batches):
            # Several processes: gradients are all-reduced with the last batch's backward only.
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if last or self.world == 1 else self._no_sync()
            with sync:
                with self.precision.autocast():
                    loss = self.task.loss(self.train_model, batch, self.device)
                if len(batches) > 1:
                    loss = loss / len(batches)
                self.scaler.scale(loss).backward()
            total += float(loss.detach())
        optimizer_step(self.model, self.optimizer, self.scaler, self.cfg.optim.grad_clip)
        self.loss = finite(total)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.state["step"] += 1
        self.state["pos"] += self.batch_size * self.world * len(batches)  # global samples
        self._agree()

    def _no_sync(self) -> contextlib.AbstractContextManager:
        return self.train_model.no_sync()  # type: ignore[operator]

    def evaluate(self) -> dict[str, Any] | None:
        """Evaluate on the validation split (between ``before_eval`` and ``after_eval``)."""
        if self.val is None:
            return None
        self._call("before_eval")
        metrics = self.task.evaluate(self.predictor, self.val, self.cfg)
        if self.ema_predictor is not None:
            metrics["ema"] = self.task.evaluate(self.ema_predictor, self.val, self.cfg)
        self.model.train()
        self.state["metrics"] = metrics
        self._call("after_eval", metrics)
        return metrics

    def save(self, kind: str) -> Path:
        """Write ``<out>/<kind>.pt`` (``last`` or ``best``) atomically, with ``config.yaml``
        beside it (not at the start: a resume that fails while reading its first batches must
        leave the run's files as they were). Rank 0 alone writes."""
        path = self.out / f"{kind}.pt"
        if dist.is_main():
            save_config(self.cfg, self.out / "config.yaml")
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
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
            "world_size": self.world,
            "global_batch": self.batch_size * self.world * self.accumulate,
        }

    @property
    def step(self) -> int:
        return self.state["step"]

    @property
    def epoch(self) -> int:
        return self.state["epoch"]

    # ------------------------------------------------------------------ building the run
    def _batches(self) -> Iterator[Any]:
        """The rest of the epoch's batches; a loader whose workers a stop signal ended too
        (Ctrl-C or a scheduler's SIGTERM to the process group) ends the loop cleanly."""
        try:
            yield from self._loader()
        except RuntimeError:
            if not self.stop.signum:
                raise
            raise _LoaderStopped from None  # the step that needed this batch never began

    def _loader(self) -> Any:
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
            rank=self.rank,
            world=self.world,
            accumulate=self.accumulate,
        )

    def _groups(self) -> Iterator[list[Any]]:
        """The loader's batches in groups of ``train.accumulate``, one group per step."""
        group: list[Any] = []
        for batch in self._batches():
            group.append(batch)
            if len(group) == self.accumulate:
                yield group
                group = []

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
        if cfg.model.sync_bn:
            self.model = dist.convert_sync_bn(self.model, self.device)
        if cfg.train.channels_last:
            _use_channels_last(self.model)

    def _parallel_model(self) -> nn.Module:
        """The model the steps run: ``self.model`` itself, or DistributedDataParallel around it
        with several processes (``self.model`` stays the unwrapped one, for checkpoints and
        the predictor)."""
        model = self.model if self.world == 1 else self._ddp()
        if self.cfg.train.compile:
            log.info("compiling the model with torch.compile (the first steps take longer)")
            model = torch.compile(model)
        return model

    def _ddp(self) -> nn.Module:
        log.info(
            "training on %d processes: data.batch_size=%d per process, global batch %d",
            self.world,
            self.batch_size,
            self.world * self.batch_size,
        )
        # Branches some steps leave out: an auxiliary head, Mask R-CNN's heads.
        unused = getattr(self.model, "task", "semantic") != "semantic"
        unused = unused or getattr(self.model, "aux_head", None) is not None
        unused = unused or getattr(self.model, "boosters", None) is not None
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(
            self.model, device_ids=ids, find_unused_parameters=unused
        )

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
        self.precision = resolve_precision(tc.precision, self.device, tc.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.scaled)

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


def _use_channels_last(model: nn.Module) -> None:
    """Keep the weights and the 4-D inputs in channels-last (NHWC) memory order, which
    oneDNN and cuDNN convolutions run faster, most of all under bfloat16/float16."""
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def nhwc(module: nn.Module, args: tuple) -> tuple:
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
            return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
        return args

    model.register_forward_pre_hook(nhwc)


def _freeze_backbone(model: nn.Module) -> None:
    backbone = getattr(model, "backbone", None) or getattr(model, "encoder", None)
    if backbone is None:
        raise ConfigError(
            f"optim.freeze_backbone=true but {type(model).__name__} has no backbone to freeze"
        )
    for p in backbone.parameters():
        p.requires_grad_(False)


def _per_process_batch(batch_size: int, n: int, world: int, accumulate: int = 1) -> int:
    """``data.batch_size``, at most the split's size (shared by the processes and by the
    ``accumulate`` batches of a step)."""
    if n < world * accumulate:
        if accumulate == 1:
            what, fix = f"the {world} processes", "use fewer processes"
        else:
            what = f"{world} process(es) x train.accumulate={accumulate}"
            fix = "lower train.accumulate"
        raise ConfigError(f"the training split has {n} images, fewer than {what}; {fix}")
    return min(batch_size, n // (world * accumulate))


def _check_global_batch(
    path: Path, ckpt: dict, batch_size: int, world: int, accumulate: int = 1
) -> None:
    """A run may resume on another number of processes (or batches per step) if the global
    batch stays the same (the same samples at each step, re-sharded)."""
    was, global_batch = ckpt.get("world_size", 1), ckpt.get("global_batch")
    now = batch_size * world * accumulate
    if was == world or not isinstance(global_batch, int) or global_batch == now:
        return
    per_step = world * accumulate
    hint = (
        f"set data.batch_size={global_batch // per_step}"
        if global_batch % per_step == 0
        else f"use a number of processes x train.accumulate that divides {global_batch}"
    )
    made = f"data.batch_size={batch_size} on {world} process(es)"
    made += f" x train.accumulate={accumulate}" if accumulate > 1 else ""
    raise ConfigError(
        f"{path} was trained with global batch {global_batch} ({was} process(es)); "
        f"{made} makes {now}; {hint} to resume it"
    )


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
    sharding: tuple[int, int, int] = (1, 1, 1),
) -> None:
    """Load a run's state from ``path`` into ``parts`` (model, optimiser, ...) and ``state``;
    anything that does not fit this recipe (or its ``sharding``: per-process batch, number of
    processes, batches per step) ends in one line naming the file."""
    ckpt = load_checkpoint(path, map_location=device)
    _check_global_batch(path, ckpt, *sharding)
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
    if "ema" in ckpt and "ema" not in parts:
        log.warning(
            "%s holds a moving average of the weights (train.ema: %s); this run has train.ema "
            "null and drops it: its checkpoints keep the raw weights only",
            path,
            ckpt["ema"].get("decay") if isinstance(ckpt["ema"], dict) else "?",
        )
    if "ema" in parts and "ema" not in ckpt:  # train.ema switched on for the rest of a run
        log.warning("%s holds no EMA of the weights: it starts from the resumed weights", path)
        parts = {k: v for k, v in parts.items() if k != "ema"}
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
