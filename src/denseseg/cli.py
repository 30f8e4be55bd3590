"""The ``denseseg`` command: thin sub-commands that parse arguments and call the library.

Errors a user can cause end in one line on stderr (``denseseg: error: ...``) and exit status 2;
never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from denseseg.errors import DensesegError

if TYPE_CHECKING:
    from denseseg.config import DataCfg

log = logging.getLogger("denseseg")


class _TqdmHandler(logging.Handler):
    # Log lines through tqdm.write so they do not tear the progress bar.
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def _setup_logging(verbose: bool) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


# ---------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from denseseg.config import load_config
    from denseseg.engine.trainer import train

    cfg = load_config(args.config, args.overrides)
    resume: bool | str = False if args.resume is None else (args.resume or True)
    result = train(cfg, resume=resume)
    m = result["metrics"]
    if m and "segm_AP" in m:  # instance models
        summary = f"; val mask AP {100 * m['segm_AP']:.2f}%"
    else:
        summary = f"; val mIoU {100 * m['mIoU']:.2f}%" if m else ""
    print(f"trained {result['step']} steps{summary}; checkpoints in {result['out_dir']}")
    return 0


# ---------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    from denseseg.api import load_model
    from denseseg.data.registry import get_dataset
    from denseseg.engine.evaluate import evaluate
    from denseseg.errors import DataError
    from denseseg.metrics import format_table, save_results
    from denseseg.viz import plot_confusion_matrix, plot_per_class_iou

    seg = load_model(args.model, device=args.device, **_tta_option(args))
    if getattr(seg, "task", "semantic") == "instance":
        from denseseg.engine.instance import run_instance_eval

        path = run_instance_eval(
            seg,
            args.dataset,
            args.root,
            args.split,
            args.out,
            json_path=args.json,
            batch_size=args.batch_size,
            num_workers=args.workers,
        )
        print(f"wrote {path}")
        return 0
    ds = get_dataset(args.dataset, args.root, args.split, **_reader_options(args.option))
    if ds.num_classes != seg.num_classes:
        raise DataError(
            f"dataset {args.root} has {ds.num_classes} classes, model {args.model} predicts "
            f"{seg.num_classes}"
        )
    metrics = evaluate(
        seg, ds, batch_size=args.batch_size, num_workers=args.workers, absent=args.absent
    )
    results = metrics.compute()
    print(format_table(results, seg.class_names))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = save_results(results, seg.class_names, out, confusion=metrics.confusion)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(written["json"], args.json)
    plot_confusion_matrix(metrics.confusion, seg.class_names, out / "confusion_matrix.png")
    plot_per_class_iou(
        results["IoU"],
        seg.class_names,
        out / "per_class_iou.png",
        title=f"{args.split}",
        palette=seg.palette,
    )
    print(f"wrote {out}/metrics.json, per_class.csv, confusion_matrix.png, per_class_iou.png")
    return 0


# ---------------------------------------------------------------------------- predict
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _list_inputs(path: Path) -> list[Path]:
    from denseseg.errors import DataError

    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) in folder {path}")
        return files
    raise DataError(f"input {path} does not exist; give an image file or a folder of images")


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from denseseg.api import load_model
    from denseseg.data.io import read_image, write_image, write_mask
    from denseseg.data.palette import overlay

    fast = {"fast": True} if args.fast else {}
    seg = load_model(
        args.model, device=args.device, threshold=args.threshold, **fast, **_tta_option(args)
    )
    files = _list_inputs(Path(args.input))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if getattr(seg, "task", "semantic") == "instance":
        from denseseg.engine.instance import predict_instances

        path = predict_instances(seg, files, out, batch_size=args.batch_size, alpha=args.alpha)
        print(f"wrote {len(files)} instance pictures and {path.name} to {out}")
        return 0
    bar = tqdm(total=len(files), desc="predict", unit="img", dynamic_ncols=True)
    for i in range(0, len(files), args.batch_size):
        chunk = files[i : i + args.batch_size]
        images = [read_image(p) for p in chunk]
        labels, probs = seg.predict_batch(images, return_probs=args.probs)
        for k, (path, image, label) in enumerate(zip(chunk, images, labels)):
            write_mask(out / f"{path.stem}.png", label, palette=seg.palette)
            write_image(
                out / f"{path.stem}_overlay.png",
                overlay(image, label, seg.palette, alpha=args.alpha),
            )
            if probs is not None:
                np.save(out / f"{path.stem}_probs.npy", probs[k].numpy().astype(np.float16))
        bar.update(len(chunk))
    bar.close()
    print(f"wrote {len(files)} label maps and overlays to {out}")
    return 0


# ---------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from denseseg.demo import run_demo

    run_demo(args.out, quick=args.quick)
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from denseseg.pretrained import pack

    extra: dict = {
        "segmenter": {"mode": args.mode, "tile_size": args.tile_size, "tta": args.tta or "none"}
    }
    if args.note:
        extra["provenance"] = {"note": args.note}
    files = pack(
        args.checkpoint,
        args.name,
        out_dir=args.out,
        fp16=not args.fp32,
        extra_meta=extra,
        precise_bn=args.precise_bn,
        data_root=args.root,
    )
    size = files["weights"].stat().st_size / 2**20
    print(f"wrote {files['weights']} ({size:.1f} MiB) and {files['json']}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from denseseg.models import list_models

    print("\n".join(list_models()))
    return 0


# ---------------------------------------------------------------------------- check-data, browse
def _data_source(args: argparse.Namespace) -> tuple[str, str | None, dict, DataCfg]:
    """(dataset, root, format options, DataCfg) from a recipe and/or --dataset/--root."""
    from denseseg.config import DataCfg, load_config
    from denseseg.errors import ConfigError

    if args.config is None and args.dataset is None:
        raise ConfigError("give a recipe (CONFIG) or --dataset (and --root)")
    dc = load_config(args.config, args.overrides).data if args.config else DataCfg()
    dataset = args.dataset or dc.dataset
    root = args.root if args.root is not None else dc.root
    options = dict(dc.demo) if dataset == "demo" else {}
    return dataset, root, options, dc


def cmd_check_data(args: argparse.Namespace) -> int:
    from denseseg.data.check import check_dataset, format_report, plot_class_histogram

    dataset, root, options, dc = _data_source(args)
    splits = args.split
    if splits is None and args.config:
        splits = [s for s in (dc.train_split, dc.val_split) if s]
    report = check_dataset(dataset, root, splits, options=options, progress=not args.no_progress)
    print(format_report(report))
    plot = plot_class_histogram(report, args.plot)
    print(f"\nwrote {plot}")
    problems = report.problems
    if problems:
        print(f"\n{len(problems)} problem(s):")
        print("\n".join(problems))
        return 1
    print("no problems found")
    return 0


def cmd_browse(args: argparse.Namespace) -> int:
    from denseseg.data.browse import browse
    from denseseg.data.registry import get_dataset
    from denseseg.data.transforms import build_transforms, default_mean_std

    dataset, root, options, dc = _data_source(args)
    split = args.split or dc.train_split
    ds = get_dataset(dataset, root, split, **options)
    transform, mean, std = None, None, None
    if args.augment:
        mean, std = default_mean_std(ds.in_channels)
        mean, std = list(dc.mean or mean), list(dc.std or std)
        transform = build_transforms(
            True, mean=mean, std=std, ignore_index=ds.ignore_index, **dc.transform_kwargs()
        )
    out = browse(ds, args.out, n=args.n, transform=transform, mean=mean, std=std, seed=args.seed)
    print(f"wrote {out} ({min(args.n, len(ds))} samples of {dataset} {split})")
    return 0


def _reader_options(items: list[str] | None) -> dict:
    """``--option`` values ``["val_slices=[4, 9]"]`` -> ``{"val_slices": [4, 9]}`` (YAML values)."""
    from denseseg.config import parse_override

    options = {}
    for item in items or []:
        parts, value = parse_override(f"data.{item}")  # the recipe's data.options syntax
        options[".".join(parts[1:])] = value
    return options


def _add_data_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="recipe YAML file or built-in recipe name")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=...")
    parser.add_argument(
        "--dataset", default=None, help=f"dataset format: {', '.join(_dataset_names())}"
    )
    parser.add_argument("--root", default=None, help="dataset folder")


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="denseseg", description="Semantic segmentation toolkit.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model from a YAML recipe")
    t.add_argument("config", help="recipe YAML file or built-in recipe name (e.g. unet_demo)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.02")
    t.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="CKPT",
        help="continue train.out_dir/last.pt (or the given checkpoint)",
    )
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint on a dataset split")
    e.add_argument(
        "--model", required=True, help="checkpoint (.pt) or built-in model name (e.g. camvid)"
    )
    e.add_argument(
        "--dataset", default="folder", help=f"dataset format: {', '.join(_dataset_names())}"
    )
    e.add_argument("--root", default=None, help="dataset folder")
    e.add_argument("--split", default="val")
    e.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="reader option (repeatable), as a recipe's data.options, e.g. val_slices=[4,9]",
    )
    e.add_argument("--out", default="runs/eval", help="folder for metrics and pictures")
    e.add_argument("--json", default=None, help="also write the metrics JSON to this file")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--workers", type=int, default=0)
    e.add_argument(
        "--absent",
        default="nan",
        choices=["nan", "zero", "gt_only"],
        help="how classes absent from the ground truth count in the means",
    )
    e.add_argument("--device", default="auto")
    _add_tta(e)
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("predict", help="segment an image or a folder of images")
    r.add_argument("input", help="image file or folder")
    r.add_argument(
        "--model",
        default="camvid",
        help="checkpoint (.pt) or built-in model name (default: camvid, the built-in street model)",
    )
    r.add_argument(
        "--fast", action="store_true", help="frozen TorchScript traces: the fastest CPU path"
    )
    r.add_argument("--out", default="runs/predict", help="output folder")
    r.add_argument("--probs", action="store_true", help="also save class probabilities (.npy)")
    r.add_argument("--batch-size", type=int, default=4)
    r.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    r.add_argument("--threshold", type=float, default=0.5, help="binary models' threshold")
    r.add_argument("--device", default="auto")
    _add_tta(r)
    r.set_defaults(func=cmd_predict)

    d = sub.add_parser("demo", help="train and compare pixelwise vs U-Net on the demo data")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--quick", action="store_true", help="a much shorter run (for smoke tests)")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("check-data", help="check a dataset: counts, class pixels, bad files")
    _add_data_source(c)
    c.add_argument(
        "--split",
        action="append",
        default=None,
        help="split to check (repeatable); default: the recipe's, else train and val",
    )
    c.add_argument(
        "--plot", default="runs/check_data/class_pixels.png", help="class histogram picture"
    )
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_check_data)

    b = sub.add_parser("browse", help="grid picture of samples with their masks overlaid")
    _add_data_source(b)
    b.add_argument("--split", default=None, help="split (default: the recipe's train split)")
    b.add_argument("--n", type=int, default=16, help="number of samples")
    b.add_argument("--augment", action="store_true", help="apply the recipe's train pipeline")
    b.add_argument("--seed", type=int, default=0, help="seed of the sample choice and augmentation")
    b.add_argument("--out", default="runs/browse/grid.png", help="PNG file to write")
    b.set_defaults(func=cmd_browse)

    k = sub.add_parser("pack", help="package a checkpoint as a built-in model (developers)")
    k.add_argument("checkpoint", help="checkpoint (.pt) written by denseseg train")
    k.add_argument("name", help="built-in name, e.g. camvid")
    k.add_argument(
        "--out",
        default=None,
        help="folder to write to (default: $DENSESEG_PRETRAINED_DIR, else the package)",
    )
    k.add_argument("--fp32", action="store_true", help="keep float32 weights (default float16)")
    k.add_argument("--mode", default="whole", choices=["whole", "overlap_tile"])
    k.add_argument("--tile-size", type=int, default=None, help="tile side for overlap_tile")
    k.add_argument("--note", default=None, help="free text kept in the provenance")
    _add_tta(k, "test-time augmentation the built-in model uses by default (none)")
    k.add_argument(
        "--precise-bn",
        type=int,
        default=0,
        metavar="N",
        help="recompute batch-norm statistics over N batches of the checkpoint's training data",
    )
    k.add_argument("--root", default=None, help="training data folder for --precise-bn")
    k.set_defaults(func=cmd_pack)

    m = sub.add_parser("models", help="list registered models")
    m.set_defaults(func=cmd_models)
    return p


def _add_tta(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    from denseseg.inference.segmenter import TTA

    parser.add_argument(
        "--tta",
        default=None,
        choices=TTA,
        help=help
        or "test-time augmentation: hflip (2 passes) or d4 (8 flips and rotations, for "
        "microscopy); default: the model's own setting",
    )


def _tta_option(args: argparse.Namespace) -> dict:
    return {"tta": args.tta} if args.tta else {}


def _dataset_names() -> tuple[str, ...]:
    from denseseg.data.registry import DATASETS

    return DATASETS


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``denseseg`` console script."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except DensesegError as exc:
        print(f"denseseg: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("denseseg: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: keep the message
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[-1]
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
