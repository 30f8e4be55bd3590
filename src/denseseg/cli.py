"""The ``denseseg`` command: thin sub-commands that parse arguments and call the library.

Errors a user can cause end in one line on stderr (``denseseg: error: ...``) and exit status 2;
never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TextIO

from denseseg.errors import ConfigError, DensesegError

if TYPE_CHECKING:
    from denseseg.config import DataCfg
    from denseseg.inference import Segmenter

log = logging.getLogger("denseseg")


def _printable(text: str, stream: TextIO) -> str:
    """``text`` as ``stream`` can print it: undecodable bytes of file names (kept by Python as
    surrogates) as ``\\xff``, characters the terminal's encoding lacks as ``\\u00e9``."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    try:
        return text.encode(encoding, "backslashreplace").decode(encoding, "replace")
    except LookupError:
        return text


def _say(text: str) -> None:
    """Print a result line (rank 0 alone, when several processes run the command)."""
    if "torch" in sys.modules:  # without torch loaded there is no process group to ask
        from denseseg.engine.distributed import is_main

        if not is_main():
            return
    print(_printable(text, sys.stdout))


class _TqdmHandler(logging.Handler):
    # Log lines through tqdm.write so they do not tear the progress bar.
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm  # not at the top: --help stays quick

        tqdm.write(_printable(self.format(record), sys.stderr), file=sys.stderr)


def _setup_logging(verbose: bool, quiet: bool = False) -> None:
    """``-v``: debug lines (what is loaded from where, with which options; per-image times);
    ``-q``: warnings and errors only, and no progress bars (``DENSESEG_QUIET=1``)."""
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    if quiet:
        from denseseg.progress import QUIET_ENV

        os.environ[QUIET_ENV] = "1"  # inherited by --nproc's workers too


# ---------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from denseseg.config import config_yaml, load_config

    if args.resume and "=" in args.resume and not Path(args.resume).exists():
        # `--resume train.max_steps=N`: the optional CKPT took an override, which it means
        args.overrides, args.resume = [*args.overrides, args.resume], ""

    cfg = load_config(args.config, args.overrides)  # checked here before torchrun starts
    if args.print_config:  # the resolved recipe: bases merged, overrides applied; no training
        sys.stdout.write(config_yaml(cfg))
        return 0
    from denseseg.engine import distributed
    from denseseg.engine.trainer import train

    launched = _on_processes(args)
    if launched is not None:
        return launched
    resume: bool | str = False if args.resume is None else (args.resume or True)
    result = train(cfg, resume=resume)
    if not distributed.is_main():
        return 0
    m = result["metrics"]
    if m and "segm_AP" in m:  # instance models
        summary = f"; val mask AP {100 * m['segm_AP']:.2f}%"
    else:
        summary = f"; val mIoU {100 * m['mIoU']:.2f}%" if m else ""
    _say(f"trained {result['step']} steps{summary}; in {result['out_dir']}:")
    _say("\n".join(f"  {name:<12} {_RUN_FILES[name]}" for name in result.get("files", [])))
    return 0


_RUN_FILES = {
    "best.pt": "the checkpoint that scored best on val (--model for eval, predict, pack)",
    "last.pt": "the last step's checkpoint (--resume continues from it)",
    "log.csv": "loss, learning rate and val metrics per step",
    "curves.png": "the loss and val metric of log.csv as a picture",
    "config.yaml": "the resolved recipe of this run",
    "tb": "TensorBoard events (tensorboard --logdir on this folder)",
}


def _launches(args: argparse.Namespace) -> bool:
    """Whether this process is about to start ``--nproc`` processes (not one of them)."""
    from denseseg.engine import distributed

    return args.nproc != 1 and distributed.torchrun_local_world_size() is None


def _on_processes(args: argparse.Namespace) -> int | None:
    """``--nproc N``: this command line run again by N processes of this machine (torchrun's
    launcher), and their exit status; None where this process does the work itself (one
    process, or one of torchrun's workers, which sees the same ``--nproc``)."""
    from denseseg.engine import distributed

    if args.nproc == 1:
        return None
    workers = distributed.torchrun_local_world_size()
    if workers is None:
        return distributed.run_torchrun(args.nproc, args.argv)
    if workers != args.nproc:
        raise ConfigError(
            f"--nproc {args.nproc} under torchrun, which started {workers} processes on this "
            "machine: leave out --nproc (torchrun's --nproc_per_node says how many)"
        )
    return None


# ---------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    from denseseg.api import load_model
    from denseseg.engine.evaluate import run_eval
    from denseseg.engine.outputs import check_out_folder

    _check_json_path(args.json, args.overwrite)
    out = Path(args.out)
    check_out_folder(out, f"--out {out}")
    _refuse_out_in_dataset(out, args.root, args.split)
    _refuse_existing_report(out, args.overwrite)
    options = _reader_options(args.option)
    if _launches(args):  # the model is checked once, before N processes start
        load_model(args.model, device="cpu", ema=args.ema, **_inference_options(args))
    launched = _on_processes(args)
    if launched is not None:
        return launched
    seg = load_model(args.model, device=args.device, ema=args.ema, **_inference_options(args))
    written = run_eval(
        seg,
        args.dataset,
        args.root,
        args.split,
        out,
        json_path=args.json,
        batch_size=args.batch_size,
        num_workers=args.workers,
        absent=args.absent,
        options=options,
        say=_say,
    )
    first, *rest = [path for kind, path in written.items() if kind != "copy"]
    _say(f"wrote {', '.join([str(first), *(p.name for p in rest)])}")
    return 0


def _refuse_out_in_dataset(out: Path, root: str | None, split: str) -> None:
    """Refuse an empty ``--split`` and an ``--out`` inside the dataset folder, where the
    evaluation's pictures and tables would be read as data next time."""
    if not split.strip():
        raise ConfigError("--split is empty; name the split to evaluate (e.g. val)")
    if root and out.resolve().is_relative_to(Path(root).resolve()):
        raise ConfigError(
            f"--out {out} lies inside the dataset folder --root {root}; the evaluation's files "
            "would be read as data next time: choose an --out outside it"
        )


def _check_json_path(path: str | None, overwrite: bool) -> None:
    """Refuse an ``--json`` that is a folder (or names one), or an existing file without
    ``--overwrite``, before any work is done."""
    from denseseg.engine.outputs import check_out_folder

    if path is None:
        return
    if not path or Path(path).is_dir() or path.endswith(("/", os.sep)):
        raise ConfigError(
            f"--json {path!r} is not a file path; give a file to write, e.g. "
            f"{Path(path or '.') / 'metrics.json'}"
        )
    check_out_folder(Path(path).parent, f"--json {path}")
    if Path(path).exists() and not overwrite:
        raise ConfigError(f"--json {path} exists; choose another file or add --overwrite")


def _refuse_existing_report(out: Path, overwrite: bool) -> None:
    """An earlier evaluation's files in ``--out`` are replaced only with ``--overwrite``."""
    from denseseg.engine.evaluate import REPORT_FILES

    existing = [out / name for name in REPORT_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"{existing[0]} exists (an earlier evaluation); choose another --out or add --overwrite"
        )


# ---------------------------------------------------------------------------- predict
def cmd_predict(args: argparse.Namespace) -> int:
    from denseseg.api import load_model
    from denseseg.engine.predict import check_outputs, predict_folder

    kwargs = {"ema": args.ema, "threshold": args.threshold, **_inference_options(args)}
    if _predicts_video(args):
        return _predict_video(args, kwargs)
    options = {"alpha": args.alpha, "probs": args.probs, "overwrite": args.overwrite}
    if _launches(args):  # the model and the outputs are checked once, before N processes start
        check = load_model(args.model, device="cpu", **kwargs)
        check_outputs(check, args.input, args.out, probs=args.probs, overwrite=args.overwrite)
        del check
    launched = _on_processes(args)
    if launched is not None:
        return launched
    seg = load_model(args.model, device=args.device, **kwargs)
    done = predict_folder(seg, args.input, args.out, batch_size=args.batch_size, **options)
    out, n = Path(args.out), len(done.inputs)
    if done.results is not None:  # an instance model
        _say(f"wrote {n} instance pictures and {done.results.name} to {out}")
        return 0
    what = "label maps, overlays and probabilities" if args.probs else "label maps and overlays"
    _say(f"wrote the {what} of {n} image(s) to {out}")
    return 0


def _predicts_video(args: argparse.Namespace) -> bool:
    """Whether ``predict``'s input is a video file (by its suffix); refuses ``--frames``
    with images."""
    from denseseg.engine.video import VIDEO_EXTS, is_video

    if is_video(args.input):
        return True
    if args.frames:
        raise ConfigError(
            f"--frames is for a video input ({', '.join(VIDEO_EXTS[:6])}, ...); each image gets "
            "its label map without it"
        )
    return False


def _predict_video(args: argparse.Namespace, kwargs: dict) -> int:
    """``denseseg predict VIDEO``: the overlay video and, with ``--frames``, the label maps."""
    from denseseg.api import load_model
    from denseseg.engine import distributed
    from denseseg.engine.video import predict_video, require_av

    if args.nproc != 1 or distributed.torchrun_local_world_size() is not None:
        raise ConfigError("a video is segmented by one process: run it without --nproc/torchrun")
    if args.probs:
        raise ConfigError(
            "--probs is for images; a video gets an overlay video and, with --frames, a label "
            "map per frame"
        )
    require_av()  # before the model loads
    seg = load_model(args.model, device=args.device, **kwargs)
    done = predict_video(
        seg,
        args.input,
        args.out,
        batch_size=args.batch_size,
        alpha=args.alpha,
        frames=args.frames,
        overwrite=args.overwrite,
    )
    maps = f" and {done.frames} label maps in {done.frames_dir}" if done.frames_dir else ""
    _say(
        f"wrote {done.video}{maps}: {done.frames} frames in {done.seconds:.1f} s "
        f"({done.frames_per_second:.1f} frames/s)"
    )
    return 0


# ---------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from denseseg.demo import run_demo

    run_demo(args.out, quick=args.quick)
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from denseseg.pretrained import pack

    extra: dict = {"segmenter": _pack_segmenter(args)}
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
        force=args.force,
        ema=args.ema,
    )
    size = files["weights"].stat().st_size / 2**20
    _say(f"wrote {files['weights']} ({size:.1f} MiB) and {files['json']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from denseseg.api import load_model
    from denseseg.inference.export import (
        check_export_target,
        default_export_path,
        export_model,
        segmenter_meta,
    )

    out = Path(args.out) if args.out else default_export_path(args.model, args.format)
    check_export_target(out, args.overwrite)  # before the slow part
    seg = load_model(args.model, device="cpu", ema=args.ema)
    written = export_model(
        seg.model,
        segmenter_meta(seg) if hasattr(seg, "mean") else dict(seg.meta),
        out,
        args.format,
        opset=args.opset,
        with_preprocess=args.with_preprocess,
        labels=args.labels,
        overwrite=args.overwrite,
    )
    _say(f"wrote {written} ({written.stat().st_size / 2**20:.1f} MiB)")
    return 0


def _pack_segmenter(args: argparse.Namespace) -> dict:
    """The inference settings ``pack`` stores: ``--crop-size`` is the tile side of
    overlap_tile (stored as ``tile_size``) or the window of slide (with ``--stride``)."""
    options = _inference_options(args)  # crop_size / stride: an int, or [height, width]
    crop, stride = options.get("crop_size"), options.get("stride")
    seg: dict = {"mode": args.mode, "tile_size": None, "tta": args.tta or "none"}
    for name, value in (("--crop-size", crop), ("--stride", stride)):
        if isinstance(value, list) and len(value) > 2:
            raise ConfigError(f"{name} takes one or two sides (H [W]), got {len(value)}")
    if args.mode != "slide" and stride is not None:
        raise ConfigError("--stride applies to --mode slide only; leave it out")
    if args.mode == "whole" and crop is not None:
        raise ConfigError("--crop-size applies to --mode slide or overlap_tile; leave it out")
    if args.mode == "overlap_tile":
        seg["tile_size"] = crop
    elif args.mode == "slide":
        seg.update(crop_size=crop, stride=stride)
    return seg


def cmd_samples(args: argparse.Namespace) -> int:
    from denseseg.data.io import atomic_write
    from denseseg.data.sample_scenes import sample_names, sample_png

    out = Path(args.out)
    targets = [(name, out / f"{name}.png") for name in sample_names()]
    existing = [str(p) for _, p in targets if p.exists()]
    if existing and not args.overwrite:
        raise ConfigError(f"{existing[0]} exists; choose another --out or add --overwrite")
    for name, path in targets:
        with atomic_write(path, "sample image") as fh:
            fh.write(sample_png(name))
    _say(f"wrote {len(targets)} sample images to {out}: {', '.join(n for n, _ in targets)}")
    return 0


def _add_samples(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "samples",
        help="write a few sample images the package draws itself (street and shape scenes)",
        description="Write the generated sample images (no download, no bundled photos): "
        "street-1/2 (480x360 street views for the built-in camvid model) and shapes-1/2 "
        "(64x64 demo scenes for models trained with the unet_demo recipe).",
    )
    s.add_argument("--out", type=_path, default="samples", help="folder (default: samples)")
    s.add_argument("--overwrite", action="store_true", help="replace files of the same names")
    s.set_defaults(func=cmd_samples)


def cmd_env(args: argparse.Namespace) -> int:
    from denseseg.env import collect, format_env

    _say(format_env(collect()))
    return 0


def _add_env(sub: argparse._SubParsersAction) -> None:
    n = sub.add_parser(
        "env",
        help="versions, CPU features and devices, for a bug report",
        description="Print what a bug report needs: the versions of Python, denseseg, torch, "
        "torchvision and the optional extras, the CPU and its vector features, torch's "
        "threads and the CUDA devices.",
    )
    n.set_defaults(func=cmd_env)


def cmd_models(args: argparse.Namespace) -> int:
    from denseseg.catalog import architectures, builtin_models, format_tables

    archs, builtins = architectures(args.filter), builtin_models(args.filter)
    if not archs and not builtins:
        raise ConfigError(f"no model name matches --filter {args.filter!r}; try '*{args.filter}*'")
    if args.names:
        _say("\n".join(row["name"] for row in [*builtins, *archs]))
        return 0
    _say(format_tables(archs, builtins))
    return 0


# ---------------------------------------------------------------------------- benchmark
def cmd_benchmark(args: argparse.Namespace) -> int:
    from denseseg.data.io import read_image
    from denseseg.engine.benchmark import benchmark, markdown_table, save_json
    from denseseg.pretrained import store_fast

    _check_json_path(args.json, args.overwrite)
    packed = _packed_model(args.model)
    if args.save and packed is None:
        raise ConfigError(
            f"--save stores the fastest path in a packed model's JSON; {args.model} is not a "
            "built-in model name or a NAME.json (denseseg pack makes one from a checkpoint)"
        )
    seg = _benchmark_segmenter(args, packed)
    result = benchmark(
        seg,
        size=tuple(args.size),
        batch=args.batch,
        runs=args.runs,
        warmup=args.warmup,
        paths=args.paths,
        reference=args.reference,
        threads=args.threads,
        image=read_image(args.image) if args.image else None,
        name=args.model,
    )
    _say(markdown_table(result))
    if args.json:
        save_json(result, args.json)
        _say(f"wrote {args.json}")
    if args.save:
        fastest = result["fastest"]
        if fastest is None:
            raise ConfigError("no torch path met the agreement thresholds; nothing stored")
        assert packed is not None
        written = store_fast(packed[0], fastest, packed[1])
        _say(f"stored the fastest path, {fastest['path']} {fastest['precision']}, in {written}")
    return 0


def _packed_model(model: str) -> tuple[str, Path | None] | None:
    """``(name, folder)`` of a packed model given by name or as its NAME.json, else None."""
    from denseseg.pretrained import builtin_files

    path = Path(model)
    if path.suffix.lower() == ".json" and path.is_file():
        if not path.with_suffix(".safetensors").is_file():
            raise ConfigError(f"{model}: no {path.stem}.safetensors beside it, not a packed model")
        return path.stem, path.parent
    if not path.is_file() and builtin_files(model) is not None:
        return model, None
    return None


def _benchmark_segmenter(
    args: argparse.Namespace, packed: tuple[str, Path | None] | None
) -> Segmenter:
    """The Segmenter benchmarked: a packed model, a checkpoint, or a registered architecture
    with random weights (:func:`denseseg.engine.benchmark.random_weights_segmenter`)."""
    from denseseg.api import load_model
    from denseseg.engine.benchmark import random_weights_segmenter
    from denseseg.inference import Segmenter
    from denseseg.models import list_models
    from denseseg.pretrained import load_builtin

    if packed is not None:
        seg = load_builtin(packed[0], device=args.device, directory=packed[1])
    elif not Path(args.model).exists() and args.model in list_models():
        seg = random_weights_segmenter(args.model, args.classes, args.device)
    else:
        seg = load_model(args.model, device=args.device)
    if not isinstance(seg, Segmenter):
        raise ConfigError(f"{args.model} is an instance model; benchmark measures semantic models")
    if seg.backend != "torch":  # an exported .onnx: there is no torch model to time
        raise ConfigError(
            f"{args.model} is an exported file: benchmark measures a model's torch paths and "
            "its ONNX backends; give the built-in name or the checkpoint it was exported from"
        )
    return seg


# ---------------------------------------------------------------------------- check-data, browse
def _data_source(args: argparse.Namespace) -> tuple[str, str | None, dict, DataCfg]:
    """(dataset, root, format options, DataCfg) from a recipe and/or --dataset/--root."""
    from denseseg.config import DataCfg, load_config

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
    _say(format_report(report))
    plot = plot_class_histogram(report, args.plot)
    _say(f"\nwrote {plot}")
    problems = report.problems
    if problems:
        _say(f"\n{len(problems)} problem(s):")
        _say("\n".join(problems))
        return 1
    _say("no problems found")
    return 0


def cmd_browse(args: argparse.Namespace) -> int:
    from denseseg.data.browse import browse
    from denseseg.data.registry import get_dataset
    from denseseg.engine.training_data import training_pipeline

    dataset, root, options, dc = _data_source(args)
    split = args.split or dc.train_split
    ds = get_dataset(dataset, root, split, **options)
    transform, mean, std = None, None, None
    if args.augment:  # the recipe's own training augmentation and normalisation
        pipeline = training_pipeline(dc, ds)
        transform, mean, std = pipeline.transform, pipeline.mean, pipeline.std
    out = browse(ds, args.out, n=args.n, transform=transform, mean=mean, std=std, seed=args.seed)
    _say(f"wrote {out} ({min(args.n, len(ds))} samples of {dataset} {split})")
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
class _Parser(argparse.ArgumentParser):
    """argparse's parser whose errors (bad type, unknown option, missing argument) are one
    line ``denseseg: error: ...`` and exit status 2, without the usage text."""

    def error(self, message: str) -> NoReturn:
        line = f"denseseg: error: {message} (see {self.prog} --help)"
        print(_printable(line, sys.stderr), file=sys.stderr)
        raise SystemExit(2)


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"needs a whole number >= {low}, got {text!r}"
            ) from None
        if value < low:
            raise argparse.ArgumentTypeError(f"needs a whole number >= {low}, got {value}")
        return value

    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"needs a number from 0 to 1, got {text!r}")
    return value


def _positive(text: str) -> float:
    """A finite number above 0 (sizes, seconds)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"needs a number above 0, got {text!r}")
    return value


def _port(text: str) -> int:
    value = _int_at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"needs a port from 0 to 65535, got {value}")
    return value


def _path(text: str) -> str:
    # An empty value (an unset shell variable: --out "$OUT") would mean the current folder.
    if not text.strip():
        raise argparse.ArgumentTypeError("needs a path, got an empty string")
    return text


_BATCH = _int_at_least(1)
_WORKERS = _int_at_least(0)


def build_parser() -> argparse.ArgumentParser:
    """The ``denseseg`` parser: one sub-command per ``_add_*`` function below."""
    from denseseg import __version__

    p = _Parser(
        prog="denseseg",
        description="Semantic and instance segmentation with PyTorch: train, evaluate, predict, "
        "export, benchmark and serve models. 'denseseg COMMAND --help' for each command.",
    )
    p.add_argument("--version", action="version", version=f"denseseg {__version__}")
    talk = p.add_mutually_exclusive_group()
    talk.add_argument(
        "-v", "--verbose", action="store_true", help="debug lines: what loads, options, timings"
    )
    talk.add_argument(
        "-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars"
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_train,
        _add_eval,
        _add_predict,
        _add_demo,
        _add_check_data,
        _add_browse,
        _add_pack,
        _add_export,
        _add_models,
        _add_benchmark,
        _add_serve,
        _add_env,
        _add_samples,
    ):
        add(sub)
    return p


def _add_train(sub: argparse._SubParsersAction) -> None:
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
    t.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved recipe (base recipes merged, overrides applied) as YAML and "
        "exit without training",
    )
    _add_nproc(
        t,
        "train on N processes of this machine (torchrun; data.batch_size is per process, the "
        "global batch N times it)",
    )
    t.set_defaults(func=cmd_train)


def _add_eval(sub: argparse._SubParsersAction) -> None:
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
    e.add_argument("--out", type=_path, default="runs/eval", help="folder for metrics and pictures")
    e.add_argument(
        "--json", type=_path, default=None, help="also write the metrics JSON to this file"
    )
    e.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier evaluation's files in --out and an existing --json file",
    )
    e.add_argument("--batch-size", type=_BATCH, default=4, help="images per forward pass (>= 1)")
    e.add_argument("--workers", type=_WORKERS, default=0, help="data loader processes (>= 0)")
    e.add_argument(
        "--absent",
        default="nan",
        choices=["nan", "zero", "gt_only"],
        help="how classes absent from the ground truth count in the means",
    )
    e.add_argument("--device", default="auto")
    _add_ema(e)
    _add_inference_options(e)
    _add_nproc(e, "evaluate on N processes of this machine (torchrun), each a share of the split")
    e.set_defaults(func=cmd_eval)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser(
        "predict",
        help="segment an image, a folder of images or a video",
        description="Segment an image or the images of a folder (hidden files skipped). Each "
        "input STEM.EXT gets STEM.png (palette label map), STEM_overlay.png and, with --probs, "
        "STEM_probs.npy in --out; an instance model gives STEM_instances.png and results.json. "
        "Two inputs that would share an output name (a.png and a.jpg; b.png and "
        "b_overlay.png) are refused, naming both, and so is an --out that is, or lies inside, "
        "the input folder: no input file is ever overwritten. Files already in --out are "
        "replaced only with --overwrite. A video (.mp4, .mov, .mkv, .webm, .avi, ...; needs "
        "denseseg[video]) gives STEM_overlay.mp4 and, with --frames, STEM_frames/NNNNNN.png.",
    )
    r.add_argument("input", help="image file, folder of images, or video file")
    r.add_argument(
        "--model",
        default="camvid",
        help="checkpoint (.pt) or built-in model name (default: camvid, the built-in street model)",
    )
    r.add_argument(
        "--out", type=_path, default="runs/predict", help="output folder, outside the input folder"
    )
    r.add_argument("--probs", action="store_true", help="also save class probabilities (.npy)")
    r.add_argument(
        "--frames",
        action="store_true",
        help="video input: also write each frame's label map (STEM_frames/NNNNNN.png)",
    )
    r.add_argument(
        "--overwrite", action="store_true", help="replace files of the same names in --out"
    )
    r.add_argument("--batch-size", type=_BATCH, default=4, help="images per forward pass (>= 1)")
    r.add_argument("--alpha", type=_fraction, default=0.5, help="overlay opacity, 0 to 1")
    r.add_argument(
        "--threshold", type=_fraction, default=0.5, help="binary models' threshold, 0 to 1"
    )
    r.add_argument("--device", default="auto")
    _add_ema(r)
    _add_inference_options(r)
    _add_nproc(r, "segment on N processes of this machine (torchrun), each a share of the images")
    r.set_defaults(func=cmd_predict)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser(
        "serve",
        help="serve a model over HTTP: an API and a web page (needs denseseg[serve])",
        description="Serve a semantic model: POST /v1/segment (label PNG, overlay PNG or JSON "
        "with per-class areas and COCO RLE masks), POST /v1/segment/batch, GET /v1/models, "
        "/healthz, /metrics (Prometheus), the API's documentation at /docs and a web page at /. "
        "Binds to 127.0.0.1 unless --host says otherwise.",
    )
    v.add_argument(
        "--model", default="camvid", help="built-in model name, checkpoint or exported .onnx"
    )
    v.add_argument("--host", default="127.0.0.1", help="address to listen on")
    v.add_argument("--port", type=_port, default=8000, help="port (0: a free one)")
    v.add_argument("--workers", type=_int_at_least(1), default=1, help="server processes")
    v.add_argument(
        "--token",
        default=None,
        help="require 'Authorization: Bearer TOKEN' on the API (default: $DENSESEG_SERVE_TOKEN)",
    )
    v.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browsers on this origin (e.g. https://example.org) to call the API; "
        "repeatable; other cross-origin requests are refused",
    )
    v.add_argument("--max-upload-mb", type=_positive, default=20.0, help="largest request body")
    v.add_argument(
        "--max-pixels", type=_int_at_least(1), default=None, help="largest image (W x H)"
    )
    v.add_argument(
        "--max-batch",
        type=_int_at_least(1),
        default=None,
        help="images per forward pass, batched from concurrent requests (default 1 on a CPU, "
        "where batching did not raise throughput; 4 on a GPU)",
    )
    v.add_argument("--batch-wait-ms", type=float, default=5.0, help="wait for more images to batch")
    v.add_argument(
        "--max-queue", type=_int_at_least(1), default=16, help="requests admitted at once"
    )
    v.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    v.add_argument("--device", default="auto")
    _add_inference_options(v)
    v.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from denseseg.serve.run import serve
    from denseseg.serve.settings import DEFAULT_MAX_PIXELS, ServeSettings, token_from

    if not args.host.strip():
        raise ConfigError("--host is empty; give an address (127.0.0.1, or 0.0.0.0 for all)")
    settings = ServeSettings(
        allowed_hosts=_loopback_names(args.host),
        model_name=Path(args.model).stem if args.model.endswith((".pt", ".onnx")) else args.model,
        token=token_from(args.token),
        cors_origins=tuple(args.cors_origin),
        max_upload_bytes=max(1, round(args.max_upload_mb * 2**20)),
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        max_queue=args.max_queue,
        timeout_s=args.timeout,
    )
    options = {"device": args.device, **_inference_options(args)}
    # Before torch loads: OpenMP threads that spin after each forward pass would take the
    # cores from the threads decoding and encoding the other requests.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return serve(args.model, settings, options, args.host, args.port, args.workers)


def _loopback_names(host: str) -> tuple[str, ...]:
    """The Host names a server bound to ``host`` answers to: the loopback names when it listens
    on a loopback address (no other machine reaches it, so another name in a request is a
    browser tricked by DNS rebinding), any name otherwise."""
    from denseseg.serve.run import is_loopback  # standard library only: no extra needed

    return ("localhost", "127.0.0.1", "::1", host) if is_loopback(host) else ()


def _add_demo(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="train and compare pixelwise vs U-Net on the demo data")
    d.add_argument("--out", type=_path, default="runs/demo")
    d.add_argument("--quick", action="store_true", help="a much shorter run (for smoke tests)")
    d.set_defaults(func=cmd_demo)


def _add_check_data(sub: argparse._SubParsersAction) -> None:
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


def _add_browse(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("browse", help="grid picture of samples with their masks overlaid")
    _add_data_source(b)
    b.add_argument("--split", default=None, help="split (default: the recipe's train split)")
    b.add_argument("--n", type=_int_at_least(1), default=16, help="number of samples")
    b.add_argument("--augment", action="store_true", help="apply the recipe's train pipeline")
    b.add_argument("--seed", type=int, default=0, help="seed of the sample choice and augmentation")
    b.add_argument("--out", type=_path, default="runs/browse/grid.png", help="PNG file to write")
    b.set_defaults(func=cmd_browse)


def _add_pack(sub: argparse._SubParsersAction) -> None:
    from denseseg.choices import MODES

    k = sub.add_parser("pack", help="package a checkpoint as a built-in model (developers)")
    k.add_argument("checkpoint", help="checkpoint (.pt) written by denseseg train")
    k.add_argument(
        "name", help="the name to load it by (--model NAME, load_model(NAME)), e.g. my_model"
    )
    k.add_argument(
        "--out",
        type=_path,
        default=None,
        help="folder to write to (default: the first folder of $DENSESEG_PRETRAINED_DIR; "
        "without either, pack refuses: it never writes into the installed package unasked)",
    )
    k.add_argument(
        "--force",
        action="store_true",
        help="replace NAME.json/NAME.safetensors already in the folder, or shadow a model "
        "shipped in the package (camvid, isbi2012) from another folder",
    )
    k.add_argument("--fp32", action="store_true", help="keep float32 weights (default float16)")
    k.add_argument(
        "--mode",
        default="whole",
        choices=MODES,
        help="how the model covers images by default: whole, slide (windows of --crop-size at "
        "--stride, for models trained on crops) or overlap_tile (valid-padding U-Nets)",
    )
    _add_window_options(k, "--tile-size")
    k.add_argument("--note", default=None, help="free text kept in the provenance")
    _add_tta(k, "test-time augmentation the built-in model uses by default (none)")
    k.add_argument(
        "--precise-bn",
        type=_WORKERS,
        default=0,
        metavar="N",
        help="recompute batch-norm statistics over N batches of the checkpoint's training data",
    )
    k.add_argument("--root", default=None, help="training data folder for --precise-bn")
    _add_ema(k)
    k.set_defaults(func=cmd_pack)


def _add_export(sub: argparse._SubParsersAction) -> None:
    from denseseg.choices import EXPORT_FORMATS as FORMATS

    x = sub.add_parser(
        "export", help="write a model as one ONNX, TorchScript or torch.export (pt2) file"
    )
    x.add_argument("model", help="built-in model name or checkpoint (.pt)")
    x.add_argument("--format", default="onnx", choices=FORMATS, help="file format (onnx)")
    x.add_argument(
        "--out",
        type=_path,
        default=None,
        help="file to write (default: MODEL_STEM.onnx / .ts / .pt2 in the current folder)",
    )
    x.add_argument(
        "--opset", type=_int_at_least(7), default=None, help="ONNX opset (default: the exporter's)"
    )
    x.add_argument(
        "--with-preprocess",
        action="store_true",
        help="input uint8 pixels, normalised inside the graph (default: normalised float32)",
    )
    x.add_argument(
        "--labels",
        action="store_true",
        help="output int64 labels (N, H, W) instead of logits (N, K, H, W)",
    )
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _add_ema(x)
    x.set_defaults(func=cmd_export)


def _add_ema(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ema",
        action="store_true",
        help="use the moving average of the weights the checkpoint keeps (train.ema)",
    )


def _add_models(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser(
        "models",
        help="the built-in trained models and the architectures, with parameter counts",
        description="Two tables: the built-in trained models (what they were measured to do) and "
        "every registered architecture with its task, parameter count (counted on the meta "
        "device, at the builder's default classes or 21) and description.",
    )
    m.add_argument(
        "--filter", default=None, metavar="PATTERN", help="only names matching, e.g. '*resnet*'"
    )
    m.add_argument("--names", action="store_true", help="bare names only, one per line")
    m.set_defaults(func=cmd_models)


def _add_benchmark(sub: argparse._SubParsersAction) -> None:
    from denseseg.choices import BENCHMARK_PATHS as PATHS
    from denseseg.choices import DEFAULT_BENCHMARK_PATHS as DEFAULT_PATHS

    b = sub.add_parser(
        "benchmark",
        help="latency, images/s, memory and agreement of every inference path of a model",
    )
    b.add_argument(
        "model",
        help="built-in model name, packed NAME.json, checkpoint (.pt), or registered "
        "architecture (random weights)",
    )
    b.add_argument(
        "--size",
        type=_BATCH,
        nargs=2,
        default=(512, 512),
        metavar=("H", "W"),
        help="input size (512 512)",
    )
    b.add_argument("--batch", type=_BATCH, default=1, metavar="N", help="images per call (1)")
    b.add_argument(
        "--threads", type=_BATCH, default=None, metavar="N", help="torch threads (default: torch's)"
    )
    b.add_argument("--runs", type=_BATCH, default=20, metavar="N", help="timed calls per path (20)")
    b.add_argument(
        "--warmup", type=_WORKERS, default=3, metavar="N", help="untimed calls per path (3)"
    )
    b.add_argument(
        "--paths",
        nargs="+",
        choices=list(PATHS),
        default=None,
        metavar="PATH",
        help=f"paths to measure, of {', '.join(PATHS)} (default: {' '.join(DEFAULT_PATHS)}); "
        "eager is always measured",
    )
    b.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time torchvision's own model with the same weights (default: when it has one)",
    )
    b.add_argument("--classes", type=_BATCH, default=21, help="classes of a random-weights model")
    b.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    b.add_argument("--image", type=_path, default=None, help="measure on this image, resized")
    b.add_argument("--json", type=_path, default=None, help="write the results to this file")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    b.add_argument(
        "--save",
        action="store_true",
        help="store the fastest torch path meeting the agreement thresholds in the packed "
        "model's JSON, for --fast",
    )
    b.set_defaults(func=cmd_benchmark)


def _add_tta(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    from denseseg.choices import TTA

    parser.add_argument(
        "--tta",
        default=None,
        choices=TTA,
        help=help
        or "test-time augmentation: hflip (2 passes), d4 (8 flips and rotations, for "
        "microscopy) or ms (scales 0.5-1.75, each also flipped: 12 passes); default: the "
        "model's own setting",
    )


def _add_nproc(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--nproc", type=_int_at_least(1), default=1, metavar="N", help=help)


def _tta_option(args: argparse.Namespace) -> dict:
    return {"tta": args.tta} if args.tta else {}


def _add_inference_options(parser: argparse.ArgumentParser) -> None:
    """The Segmenter's options shared by predict and eval (and serve): where the forward pass
    runs, how images are covered, test-time augmentation. Each defaults to the model's own
    setting (None here: not passed on)."""
    from denseseg.choices import BACKENDS, MODES

    _add_tta(parser)
    parser.add_argument(
        "--backend",
        default=None,
        choices=BACKENDS,
        help="where the forward pass runs (default torch; onnxruntime and openvino need the "
        "extras denseseg[onnx] / denseseg[openvino])",
    )
    parser.add_argument(
        "--fast",
        action="store_true",
        help="the fastest torch path measured for this model (denseseg benchmark), else a "
        "frozen TorchScript trace",
    )
    parser.add_argument(
        "--precision",
        default=None,
        choices=("fp32", "bf16"),
        help="bf16: bfloat16 (torch: autocast; openvino: its bf16 precision; not onnxruntime)",
    )
    parser.add_argument(
        "--mode", default=None, choices=MODES, help="how images are covered (default: the model's)"
    )
    _add_window_options(parser)


def _add_window_options(parser: argparse.ArgumentParser, *aliases: str) -> None:
    """--crop-size (also named ``aliases``) and --stride: the windows of slide mode."""
    parser.add_argument(
        "--crop-size",
        *aliases,
        type=_int_at_least(1),
        nargs="+",
        default=None,
        metavar="N",
        help="window side(s) H [W] for --mode slide, tile side(s) for overlap_tile",
    )
    parser.add_argument(
        "--stride",
        type=_int_at_least(1),
        nargs="+",
        default=None,
        metavar="N",
        help="window step(s) H [W] for --mode slide; default two thirds of the window",
    )


def _inference_options(args: argparse.Namespace) -> dict:
    """The Segmenter options the user gave on the command line (the rest stay the model's)."""
    options = _tta_option(args)
    if getattr(args, "fast", False):
        options["fast"] = True
    for name in ("backend", "precision", "mode", "crop_size", "stride"):
        value = getattr(args, name, None)
        if value is not None:
            options[name] = value[0] if isinstance(value, list) and len(value) == 1 else value
    return options


def _dataset_names() -> tuple[str, ...]:
    from denseseg.choices import DATASETS

    return DATASETS


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``denseseg`` console script.

    Returns the exit status: 0, 1 (``check-data`` found problems), 2 (an error the user can
    fix, a bad command line included, printed as one line ``denseseg: error: ...``), 130 or 143
    (training stopped by SIGINT or SIGTERM after saving, or interrupted elsewhere).
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0), or a bad command line (its one line is printed)
        return exc.code if isinstance(exc.code, int) else 2
    _setup_logging(args.verbose, args.quiet)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for --nproc's workers
    log.debug("denseseg %s (Python %s)", " ".join(args.argv), sys.version.split()[0])
    try:
        return args.func(args)
    except DensesegError as exc:
        if getattr(exc, "quiet", False):  # a rank that another rank's failure stopped
            return exc.exit_code
        return _fail(_one_line(exc), getattr(exc, "exit_code", 2))
    except BrokenPipeError:  # `denseseg models | head -1`: the reader had enough
        sys.stdout = open(os.devnull, "w")  # nothing more may reach the closed pipe
        return 0
    except OSError as exc:  # a read-only or full folder, an --out under a regular file, ...
        return _fail(_os_error_line(exc))
    except KeyboardInterrupt:
        print("denseseg: interrupted", file=sys.stderr)
        return 130


def _fail(message: str, code: int = 2) -> int:
    print(_printable(f"denseseg: error: {message}", sys.stderr), file=sys.stderr)
    return code


_OS_HINTS = {
    errno.EROFS: "choose a folder you can write to",
    errno.EACCES: "check its permissions or choose another folder",
    errno.EPERM: "check its permissions or choose another folder",
    errno.ENOSPC: "free some space or choose another disk",
    errno.EDQUOT: "free some space or choose another disk",
    errno.ENOTDIR: "a part of that path is a file, not a folder",
    errno.EISDIR: "it is a folder; give a file",
    errno.ENOENT: "check the path",
}


def _os_error_line(exc: OSError) -> str:
    """``PATH: reason; what to do`` for an OSError from the file system."""
    name = exc.filename if exc.filename is not None else exc.filename2
    where = os.fsdecode(name) if isinstance(name, bytes | str) else None
    reason = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    hint = _OS_HINTS.get(exc.errno or 0)
    text = f"{where}: {reason}" if where is not None else reason
    return f"{text}; {hint}" if hint else text


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: keep the message
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[-1]
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
