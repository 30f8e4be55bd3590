"""``train(cfg)``: the whole training run, top to bottom, as one flat, readable function family.

Step-based: the learning-rate schedule, evaluation, logging and checkpoints all count optimiser
steps. Everything a resume needs (model, optimiser, scheduler, grad scaler, step, epoch, sampler
position, RNG states, resolved config) goes into each checkpoint, so ``resume=True`` continues
exactly where a run stopped. Ctrl-C or SIGTERM stops after the current step and saves a consistent
``last.pt`` (:mod:`denseseg.engine.stop`); the run folder is locked against a second training
(:mod:`denseseg.engine.run_folder`).
"""

from __future__ import annotations

import csv
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from denseseg.config import Config, save_config
from denseseg.data.registry import get_dataset
from denseseg.data.transforms import build_eval_resize, build_transforms, default_mean_std
from denseseg.engine.checkpoint import (
    FORMAT_VERSION,
    atomic_save,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    set_rng_state,
)
from denseseg.engine.evaluate import evaluate
from denseseg.engine.instance import (
    BEST_METRIC,
    check_instance_data,
    evaluate_instances,
    instance_collate,
    instance_meta,
    instance_train_step,
    is_instance_model,
    log_instance_metrics,
)
from denseseg.engine.optim import backward_and_step, build_optimizer, lr_factor
from denseseg.engine.precise_bn import calibration_batches, recompute_bn_stats
from denseseg.engine.run_folder import RunLock, make_run_folder
from denseseg.engine.sampler import EpochSampler, SeededTransformDataset
from denseseg.engine.stop import StopOnSignal, ignore_stop_signals
from denseseg.errors import CheckpointError, ConfigError, DataError, Interrupted
from denseseg.inference.instance import InstanceSegmenter
from denseseg.inference.segmenter import Segmenter, resolve_device
from denseseg.losses import build_loss
from denseseg.models import create_model
from denseseg.models.weights import load_model_weights

log = logging.getLogger("denseseg")

CSV_FIELDS = ["step", "epoch", "lr", "loss", "val_mIoU", "val_mAcc", "val_aAcc", "elapsed_s"]
CSV_FIELDS += ["val_bbox_AP", "val_segm_AP"]  # instance models


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


def _class_weights(cfg: Config, dataset: Any, num_classes: int) -> torch.Tensor | None:
    cw = cfg.loss.class_weights
    if cw is None:
        return None
    if cw == "median_frequency":
        from denseseg.data.folder import median_frequency_weights

        return median_frequency_weights(dataset).float()
    if isinstance(cw, list):
        if len(cw) != num_classes:
            raise ConfigError(f"loss.class_weights has {len(cw)} values for {num_classes} classes")
        return torch.tensor(cw, dtype=torch.float32)
    raise ConfigError(f"loss.class_weights={cw!r}: use null, median_frequency or a list of numbers")


def _use_weight_map(
    cfg: Config, dataset: Any, tfm: Any, class_weights: torch.Tensor | None, model_kwargs: dict
) -> tuple[SeededTransformDataset, nn.Module]:
    """U-Net's border weight map: each augmented sample carries its map (w_c included, from
    ``class_weights`` when given), and the loss becomes the pixel-weighted cross-entropy."""
    from denseseg.losses.weight_map import (
        PixelWeightedCrossEntropy,
        WithWeightMap,
        parse_weight_map,
    )

    opts = parse_weight_map(cfg.loss.weight_map)
    if cfg.loss.name != "ce" or model_kwargs["num_classes"] < 2:
        raise ConfigError(
            f"loss.weight_map needs loss.name: ce and a model with >= 2 classes (got "
            f"{cfg.loss.name!r}, {model_kwargs['num_classes']} classes)"
        )
    wrapped = WithWeightMap(
        tfm,
        **opts,
        class_weights=class_weights,
        ignore_index=dataset.ignore_index,
        num_classes=model_kwargs["num_classes"],
    )
    return SeededTransformDataset(dataset, wrapped), PixelWeightedCrossEntropy(dataset.ignore_index)


def _freeze_backbone(model: nn.Module) -> None:
    backbone = getattr(model, "backbone", None) or getattr(model, "encoder", None)
    if backbone is None:
        raise ConfigError(
            f"optim.freeze_backbone=true but {type(model).__name__} has no backbone to freeze"
        )
    for p in backbone.parameters():
        p.requires_grad_(False)


class _CsvLog:
    """Appends rows to ``log.csv``; on resume drops rows written after the checkpoint's step."""

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
    except ImportError:  # tensorboard is a dependency, but users may strip it
        log.warning("tensorboard is not installed; writing CSV logs only")
        return None
    return SummaryWriter(str(out / "tb"))


def train(cfg: Config, resume: bool | str | Path = False) -> dict[str, Any]:
    """Train a model as the recipe ``cfg`` says.

    Args:
        cfg: the resolved recipe (see :mod:`denseseg.config`).
        resume: False to start fresh (refused if the output folder already holds ``last.pt``),
            True to continue from ``<out_dir>/last.pt``, or the path of a checkpoint.

    Returns:
        ``{"out_dir", "step", "best_mIoU", "metrics" (last evaluation), "checkpoint"}``;
        instance models give ``best_segm_AP`` (COCO mask AP) instead of ``best_mIoU``.
    """
    out = make_run_folder(cfg.train.out_dir)
    with RunLock(out):  # before any data is read: a second run on this folder stops here
        for stale in remove_stale_temporaries(out):
            log.info("removed %s, left by a save that was killed", stale.name)
        return _train_in(cfg, out, _resume_path(out, resume))


def _train_in(cfg: Config, out: Path, ckpt_path: Path | None) -> dict[str, Any]:
    tc, dc = cfg.train, cfg.data
    seed_everything(tc.seed, tc.deterministic)
    device = resolve_device(tc.device)

    opts = dc.reader_options()
    train_raw = get_dataset(dc.dataset, dc.root, dc.train_split, **opts)
    # Evaluation reads raw uint8 items; eval_resize (optional) only resizes them.
    val_tfm = build_eval_resize(dc.eval_resize) if dc.eval_resize is not None else None
    val_raw = (
        get_dataset(dc.dataset, dc.root, dc.val_split, transforms=val_tfm, **opts)
        if dc.val_split
        else None
    )
    if len(train_raw) == 0:  # type: ignore[arg-type]
        raise DataError(f"the {dc.train_split!r} split of {dc.root or dc.dataset} has no images")
    num_classes, in_channels = train_raw.num_classes, train_raw.in_channels
    model, model_kwargs = build_model_for(cfg, num_classes, in_channels)
    if cfg.model.weights:
        load_model_weights(model, cfg.model.weights)  # logs what it skipped
    if cfg.optim.freeze_backbone:
        _freeze_backbone(model)
    model.to(device)
    instance = is_instance_model(model)
    if instance:
        check_instance_data(train_raw, dc)
        if tc.precise_bn:
            raise ConfigError("train.precise_bn applies to semantic models; set it to 0")

    mean, std = default_mean_std(in_channels)
    mean, std = list(dc.mean or mean), list(dc.std or std)
    if instance:  # the model normalises inside: it takes 0-1 images
        mean, std = [0.0] * in_channels, [1.0] * in_channels
    tfm = build_transforms(
        True, mean=mean, std=std, ignore_index=train_raw.ignore_index, **dc.transform_kwargs()
    )
    train_ds = SeededTransformDataset(train_raw, tfm)
    weights = _class_weights(cfg, train_raw, num_classes)
    criterion = build_loss(
        cfg.loss.name,
        num_classes=model_kwargs["num_classes"],
        ignore_index=train_raw.ignore_index,
        class_weights=weights.to(device) if weights is not None else None,
        **({"dice_weight": cfg.loss.dice_weight} if "+dice" in cfg.loss.name else {}),
    )
    if cfg.loss.weight_map:
        train_ds, criterion = _use_weight_map(cfg, train_raw, tfm, weights, model_kwargs)
    oc, sc = cfg.optim, cfg.schedule
    optimizer = build_optimizer(
        model,
        oc.name,
        lr=oc.lr,
        weight_decay=oc.weight_decay,
        momentum=oc.momentum,
        nesterov=oc.nesterov,
        betas=tuple(oc.betas),
        backbone_lr_mult=oc.backbone_lr_mult,
        no_decay_norm_bias=oc.no_decay_norm_bias,
    )
    min_ratio = sc.min_lr / oc.lr if oc.lr > 0 else 0.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(
            s,
            tc.max_steps,
            name=sc.name,
            power=sc.power,
            warmup_steps=sc.warmup_steps,
            warmup_factor=sc.warmup_factor,
            min_ratio=min_ratio,
            milestones=sc.milestones,
            gamma=sc.gamma,
        ),
    )
    amp = tc.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    meta = {
        "model_name": cfg.model.name,
        "model_kwargs": model_kwargs,
        "class_names": list(train_raw.classes),
        "palette": [list(p) for p in train_raw.palette],
        "mean": mean,
        "std": std,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "ignore_index": train_raw.ignore_index,
        "class_weights": weights.tolist() if weights is not None else None,
        **(instance_meta(train_raw, dc) if instance else {}),
    }
    best_key = f"best_{BEST_METRIC}" if instance else "best_mIoU"
    state = {"step": 0, "epoch": 0, "pos": 0, best_key: -1.0, "metrics": None}
    if ckpt_path is not None:
        parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
        _restore(ckpt_path, device, cfg.model.name, model_kwargs, parts, state)
        log.info("resumed from %s at step %d", ckpt_path, state["step"])

    if instance:
        segmenter: Any = InstanceSegmenter(model, class_names=train_raw.classes, device=device)
    else:
        segmenter = Segmenter(
            model,
            mean=mean,
            std=std,
            class_names=train_raw.classes,
            palette=train_raw.palette,
            ignore_index=train_raw.ignore_index,
            device=device,
        )
    csv_log = _CsvLog(out / "log.csv", state["step"] if ckpt_path else None)
    writer = _open_tensorboard(out, tc.tensorboard)

    def save(kind: str, **extra: Any) -> Path:
        # Beside each checkpoint, not at the start: a resume that fails while reading its
        # first batches must leave the run's files as they were.
        save_config(cfg, out / "config.yaml")
        ckpt = {
            "format_version": FORMAT_VERSION,
            **meta,
            **{k: state[k] for k in state},
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng_state(),
            "config": cfg.to_dict(),
            **extra,
        }
        path = out / f"{kind}.pt"
        atomic_save(ckpt, path)
        return path

    def run_eval() -> None:
        if val_raw is None:
            return
        if instance:
            state["metrics"] = metrics = evaluate_instances(
                segmenter,
                val_raw,
                batch_size=dc.eval_batch_size,
                num_workers=dc.num_workers,
                progress=tc.progress,
            )
            model.train()
            score = log_instance_metrics(metrics, state["step"], state["epoch"], csv_log, writer)
            if score == score and score > state[best_key]:
                state[best_key] = score
                save("best")
            return
        if tc.precise_bn:
            batches = calibration_batches(
                train_ds, tc.precise_bn, bs, seed=tc.seed * 1_000_003 + state["step"]
            )
            recompute_bn_stats(model, batches, device)
        metrics = evaluate(
            segmenter,
            val_raw,
            batch_size=dc.eval_batch_size,
            num_workers=dc.num_workers,
            progress=tc.progress,
        ).compute()
        model.train()
        state["metrics"] = metrics
        miou = metrics["mIoU"]
        log.info(
            "step %d  val mIoU %.2f%%  mAcc %.2f%%  aAcc %.2f%%",
            state["step"],
            100 * miou,
            100 * metrics["mAcc"],
            100 * metrics["aAcc"],
        )
        csv_log.write(
            step=state["step"],
            epoch=state["epoch"],
            val_mIoU=f"{miou:.6f}",
            val_mAcc=f"{metrics['mAcc']:.6f}",
            val_aAcc=f"{metrics['aAcc']:.6f}",
        )
        if writer is not None:
            for k in ("mIoU", "mAcc", "aAcc"):
                writer.add_scalar(f"val/{k}", metrics[k], state["step"])
        if miou == miou and miou > state["best_mIoU"]:
            state["best_mIoU"] = miou
            save("best")

    n = len(train_ds)
    bs = min(dc.batch_size, n)
    model.train()
    start = time.time()
    bar = tqdm(
        total=tc.max_steps,
        initial=state["step"],
        desc="train",
        disable=not tc.progress,
        dynamic_ncols=True,
    )
    saved_step = state["step"] if ckpt_path == out / "last.pt" else None
    stop = StopOnSignal().__enter__()
    try:
        while state["step"] < tc.max_steps and not stop.signum:
            sampler = EpochSampler(n, tc.seed, state["epoch"], state["pos"])
            loader = DataLoader(
                train_ds,
                batch_size=bs,
                sampler=sampler,
                num_workers=dc.num_workers,
                drop_last=True,
                pin_memory=device.type == "cuda",
                persistent_workers=False,
                collate_fn=instance_collate if instance else None,
                worker_init_fn=ignore_stop_signals,
            )
            for images, targets, *pixel_weights in loader:
                if stop.signum:  # arrived while the batch was being read: the step never began
                    break
                if instance:
                    loss = instance_train_step(
                        model, optimizer, scaler, images, targets, device, amp, oc.grad_clip
                    )
                else:
                    loss = _train_step(
                        model,
                        criterion,
                        optimizer,
                        scaler,
                        images,
                        targets,
                        device,
                        amp,
                        oc.grad_clip,
                        cfg.loss.aux_weight,
                        pixel_weights[0] if pixel_weights else None,
                    )
                scheduler.step()
                state["step"] += 1
                state["pos"] += bs
                step = state["step"]
                bar.update(1)
                if step % tc.log_every == 0 or step == tc.max_steps:
                    lr = optimizer.param_groups[0]["lr"]
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                    csv_log.write(
                        step=step,
                        epoch=state["epoch"],
                        lr=f"{lr:.6g}",
                        loss=f"{loss:.6f}",
                        elapsed_s=f"{time.time() - start:.1f}",
                    )
                    if writer is not None:
                        writer.add_scalar("train/loss", loss, step)
                        writer.add_scalar("train/lr", lr, step)
                if (tc.eval_every and step % tc.eval_every == 0) or step == tc.max_steps:
                    run_eval()
                if (tc.ckpt_every and step % tc.ckpt_every == 0) or step == tc.max_steps:
                    _keep_last(out, save("last"), step, tc.keep_last)
                    saved_step = step
                if step >= tc.max_steps or stop.signum:
                    break
            else:
                state["epoch"] += 1
                state["pos"] = 0
    except KeyboardInterrupt:  # a second signal: stop at once, the step may be half done
        raise Interrupted(
            f"stopped during step {state['step'] + 1} without saving; "
            + _last_saved(out, saved_step),
            stop.signum or 2,
        ) from None
    finally:
        stop.__exit__(None, None, None)
        bar.close()
        if writer is not None:
            writer.close()
    if stop.signum and state["step"] < tc.max_steps:
        path = save("last") if saved_step != state["step"] else out / "last.pt"
        raise Interrupted(
            f"{stop.name} at step {state['step']}: saved {path}; continue with --resume",
            stop.signum,
        )
    return {
        "out_dir": str(out),
        "step": state["step"],
        best_key: state[best_key],
        "metrics": state["metrics"],
        "checkpoint": str(out / "last.pt"),
    }


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


def _train_step(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    images: torch.Tensor,
    targets: torch.Tensor,
    device: torch.device,
    amp: bool,
    grad_clip: float | None,
    aux_weight: float = 0.0,
    pixel_weights: torch.Tensor | None = None,
) -> float:
    images = images.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    # Per-pixel loss weights (U-Net's weight map) travel with the targets and are cropped alike.
    extra = () if pixel_weights is None else (pixel_weights.to(device, non_blocking=True),)
    with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
        out = model(images)
        logits = out["out"]
        if logits.shape[-2:] != targets.shape[-2:]:
            targets = _center_crop(targets, logits.shape[-2:])
            extra = tuple(_center_crop(w, logits.shape[-2:]) for w in extra)
        loss = criterion(logits.float(), targets, *extra)
        if "aux" in out and aux_weight:
            # torchvision's reference training: loss + 0.5 * the auxiliary head's loss.
            loss = loss + aux_weight * criterion(out["aux"].float(), targets, *extra)
    return backward_and_step(loss, model, optimizer, scaler, grad_clip)


def _center_crop(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # Valid-padding networks see only the centre of their input: train on the matching labels.
    h, w = t.shape[-2:]
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    return t[..., top : top + size[0], left : left + size[1]]


def _keep_last(out: Path, last: Path, step: int, k: int) -> None:
    # A hard link to the fresh last.pt costs no I/O; the next atomic save gives last.pt a new
    # inode, so the linked file keeps this step's content.
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
