"""The training loop's extension points, as detectron2's ``HookBase``.

A hook is called before training, after each optimiser step, before and after each evaluation,
and at the end (also when training stops on an error or a signal). Logging, evaluation,
PreciseBN and checkpointing are hooks; ``train(cfg, hooks=[MyHook()])`` adds your own, called
after the built-in ones. A hook reads the trainer's public attributes (``step``, ``epoch``,
``model``, ``optimizer``, ``loss``, ``cfg``, ``out``, ``state``).
"""

from __future__ import annotations

import csv
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from denseseg.engine.distributed import is_main
from denseseg.engine.precise_bn import calibration_batches, recompute_bn_stats
from denseseg.progress import tqdm

if TYPE_CHECKING:
    from denseseg.engine.trainer import Trainer

log = logging.getLogger("denseseg")

__all__ = ["CheckpointHook", "EvalHook", "HookBase", "LogHook", "PreciseBNHook", "default_hooks"]

CSV_FIELDS = ["step", "epoch", "lr", "loss", "val_mIoU", "val_mAcc", "val_aAcc", "elapsed_s"]
CSV_FIELDS += ["val_bbox_AP", "val_segm_AP"]  # instance models
CSV_FIELDS += ["val_ema_mIoU", "val_ema_segm_AP"]  # the EMA of the weights (train.ema)


class HookBase:
    """Override any of these; each gets the trainer."""

    def before_train(self, trainer: Trainer) -> None:
        """Once, before the first step (after a resume has restored the state)."""

    def after_step(self, trainer: Trainer) -> None:
        """After each optimiser step; ``trainer.step`` counts it already."""

    def before_eval(self, trainer: Trainer) -> None:
        """Before each evaluation."""

    def after_eval(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """After each evaluation, with its metrics."""

    def after_train(self, trainer: Trainer) -> None:
        """At the end, whether training finished, stopped on a signal or failed."""


def _due(step: int, every: int, last: int) -> bool:
    return bool(every and step % every == 0) or step == last


class LogHook(HookBase):
    """Progress bar, ``log.csv`` (rewritten atomically on resume) and TensorBoard; written by
    rank 0 alone when several processes train."""

    def before_train(self, trainer: Trainer) -> None:
        tc = trainer.cfg.train
        self.active = is_main()
        if not self.active:
            return
        self.start = time.time()
        log.info("%s", summary(trainer))
        self.csv = CsvLog(trainer.out / "log.csv", trainer.step if trainer.resumed else None)
        self.writer = _open_tensorboard(trainer.out, tc.tensorboard)
        self.bar = tqdm(
            total=tc.max_steps,
            initial=trainer.step,
            desc="train",
            disable=not tc.progress,
            dynamic_ncols=True,
        )

    def after_step(self, trainer: Trainer) -> None:
        step, tc = trainer.step, trainer.cfg.train
        if not self.active:
            return
        self.bar.update(1)
        if not (step % tc.log_every == 0 or step == tc.max_steps):
            return
        lr, loss = trainer.optimizer.param_groups[0]["lr"], trainer.loss
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        elapsed = f"{time.time() - self.start:.1f}"
        row = {"lr": f"{lr:.6g}", "loss": f"{loss:.6f}", "elapsed_s": elapsed}
        self.csv.write(step=step, epoch=trainer.epoch, **row)
        self._scalars({"train/loss": loss, "train/lr": lr}, step)

    def after_eval(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        report = trainer.task.report(metrics, trainer.step)
        log.info("%s", report.line)
        row, scalars = dict(report.csv), dict(report.scalars)
        if "ema" in metrics:
            best = trainer.task.best_metric
            ema = trainer.task.report(metrics["ema"], trainer.step)
            log.info("%s", ema.line.replace(" val ", " val (EMA of the weights) ", 1))
            row[f"val_ema_{best}"] = f"{metrics['ema'][best]:.6f}"
            scalars.update({k.replace("val/", "val_ema/"): v for k, v in ema.scalars.items()})
        self.csv.write(step=trainer.step, epoch=trainer.epoch, **row)
        self._scalars(scalars, trainer.step)

    def after_train(self, trainer: Trainer) -> None:
        if hasattr(self, "bar"):
            self.bar.close()
        if getattr(self, "writer", None) is not None:
            self.writer.close()

    def _scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)


class PreciseBNHook(HookBase):
    """Recompute batch-norm statistics over ``train.precise_bn`` training batches before each
    evaluation (:mod:`denseseg.engine.precise_bn`), and after the last step of a run without
    validation (so that its final ``last.pt`` keeps them too); draws no random numbers of the
    run's."""

    def after_step(self, trainer: Trainer) -> None:
        if trainer.val is None and trainer.step == trainer.cfg.train.max_steps:
            self.before_eval(trainer)  # runs before the checkpoint hook saves last.pt

    def before_eval(self, trainer: Trainer) -> None:
        tc = trainer.cfg.train
        seed = tc.seed * 1_000_003 + trainer.step
        batches = calibration_batches(trainer.data.dataset, tc.precise_bn, trainer.batch_size, seed)
        if trainer.ema is not None:  # the same batches for the EMA, read and augmented once
            batches = list(batches)
            recompute_bn_stats(trainer.ema.module, batches, trainer.device)
        recompute_bn_stats(trainer.model, batches, trainer.device)


class EvalHook(HookBase):
    """Evaluate every ``train.eval_every`` steps and after the last one."""

    def after_step(self, trainer: Trainer) -> None:
        tc = trainer.cfg.train
        if _due(trainer.step, tc.eval_every, tc.max_steps):
            trainer.evaluate()


class CheckpointHook(HookBase):
    """``last.pt`` every ``train.ckpt_every`` steps, after the last step and when a signal
    stops training (keeping the last ``train.keep_last`` as ``step_*.pt``); ``best.pt`` when
    an evaluation beats the best so far."""

    def after_step(self, trainer: Trainer) -> None:
        tc = trainer.cfg.train
        if _due(trainer.step, tc.ckpt_every, tc.max_steps):
            last = trainer.save("last")
            if is_main():
                keep_last(trainer.out, last, trainer.step, tc.keep_last)

    def after_eval(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        key = f"best_{trainer.task.best_metric}"
        score = metrics[trainer.task.best_metric]
        if score == score and score > trainer.state[key]:
            trainer.state[key] = score
            trainer.save("best")

    def after_train(self, trainer: Trainer) -> None:
        if trainer.stopped and trainer.saved_step != trainer.step:
            trainer.save("last")


def summary(trainer: Trainer) -> str:
    """One line on what is about to run: model and size, data, batches, device, precision."""
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    params = sum(p.numel() for p in model.parameters())
    n_train, world, batch = len(trainer.data.dataset), trainer.world, trainer.batch_size
    n_val = len(trainer.val) if trainer.val is not None else 0
    tc, acc = trainer.cfg.train, trainer.accumulate
    steps = n_train // (batch * world * acc) or 1
    start = f"from step {trainer.step}" if trainer.resumed else "from scratch"
    kind = getattr(model, "task", "semantic")
    accumulate = f" x {acc} accumulated" if acc > 1 else ""
    extras = [f"EMA {tc.ema}"] if tc.ema else []
    extras += [name for name in ("channels_last", "compile") if getattr(tc, name)]
    return (
        f"{trainer.cfg.model.name} ({kind}, {params:,} parameters); {n_train} training / "
        f"{n_val} validation samples; batch {batch} x {world} process(es){accumulate} = "
        f"{batch * world * acc}, {steps} steps per epoch; {trainer.device}, "
        f"{', '.join([str(trainer.precision), *extras])}; {tc.max_steps} steps {start}"
    )


def default_hooks(trainer: Trainer) -> list[HookBase]:
    """Logging, PreciseBN (when ``train.precise_bn``), evaluation, checkpointing, in that order."""
    precise = [PreciseBNHook()] if trainer.cfg.train.precise_bn else []
    return [LogHook(), *precise, EvalHook(), CheckpointHook()]


class CsvLog:
    """Appends rows to ``log.csv``; on resume keeps only the rows up to the checkpoint's step."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        rows = self._rows_up_to(resume_step) if resume_step is not None else []
        # Rewritten atomically: a kill during the rewrite must not lose the kept rows.
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", newline="") as fh:
            w = csv.DictWriter(fh, CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)

    def _rows_up_to(self, step: int) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        with self.path.open(newline="", errors="replace") as fh:
            rows = list(csv.DictReader(fh))
        kept = [r for r in rows if _int_or_none(r.get("step")) is not None]
        if len(kept) < len(rows):
            log.warning("%s: dropped %d unreadable rows", self.path, len(rows) - len(kept))
        return [r for r in kept if _int_or_none(r["step"]) <= step]  # type: ignore[operator]

    def write(self, **row: Any) -> None:
        with self.path.open("a", newline="") as fh:
            csv.DictWriter(fh, CSV_FIELDS).writerow({k: row.get(k, "") for k in CSV_FIELDS})


def _int_or_none(text: Any) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def _open_tensorboard(out: Path, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the extra denseseg[tb]; on by default, so skipped, not refused
        log.warning(
            "TensorBoard logging skipped: tensorboard is not installed (pip install "
            "'denseseg[tb]'; train.tensorboard=false silences this); log.csv is written"
        )
        return None
    return SummaryWriter(str(out / "tb"))


def keep_last(out: Path, last: Path, step: int, k: int) -> None:
    """Keep ``last.pt`` of ``step`` as ``step_NNNNNNN.pt`` too, and only the newest ``k``.

    A hard link to the fresh ``last.pt`` costs no I/O; the next atomic save gives ``last.pt`` a
    new inode, so the linked file keeps this step's content."""
    if k <= 0:
        return
    dst = out / f"step_{step:07d}.pt"
    dst.unlink(missing_ok=True)
    try:
        os.link(last, dst)
    except OSError:
        import shutil

        shutil.copy2(last, dst)
    for old in sorted(out.glob("step_*.pt"))[:-k]:
        old.unlink(missing_ok=True)
