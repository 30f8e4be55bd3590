"""Images/s of one training step: denseseg's trainer against torchvision's reference step.

One step is the forward pass, the loss, backward, the optimiser step and the learning-rate
schedule; data loading is not timed (one batch of training crops is prepared beforehand and
reused). Each model is timed in these configurations (``--configs``, names below):

* ``reference``: torchvision's model (``weights=None``, ``weights_backbone=None``) trained as
  torchvision's ``references/segmentation/train.py`` trains it, written out here: eager float32,
  ``cross_entropy(ignore_index=255)`` summed over the outputs with ``aux`` weighted 0.5, SGD (lr
  0.01, momentum 0.9, weight decay 1e-4; the auxiliary head at 10x lr), ``zero_grad``,
  ``backward``, ``step``, the poly ``LambdaLR``, ``loss.item()``;
* ``tv-...``: the same step with one or two changes (``cl``: channels-last weights and input,
  ``bf16``: bfloat16 autocast, ``compile``: torch.compile, ``1thread``: one torch thread);
* ``denseseg...``: denseseg's :class:`~denseseg.engine.trainer.Trainer` built from the recipe,
  timing ``trainer.run_step(batch)``; ``cl``, ``bf16`` and ``compile`` are the recipe keys
  ``train.channels_last``, ``train.precision`` and ``train.compile``; ``1thread`` is
  ``torch.set_num_threads(1)`` around the step.

LR-ASPP MobileNetV3-Large uses the recipe ``lraspp_mobilenet_v3_large_camvid`` (AdamW, median
frequency class weights) on 288x384 crops; DeepLabV3-ResNet50 uses the same recipe with
``aux_loss`` and torchvision's SGD settings on 512x512 crops. The crops come from CamVid at
``--root`` when it exists, else from random frames written to a temporary folder.

The configurations take turns step by step (the order rotates each round); each row's ratio is
the median over rounds of the reference's step time divided by its own in the same round, so a
shared machine's changing load cancels out of the ratios (not out of the absolute times)::

    PYTHONPATH=src python benchmarks/train_speed.py                    # LR-ASPP, default rows
    PYTHONPATH=src python benchmarks/train_speed.py --models deeplab --batch 2 --steps 3
    PYTHONPATH=src python benchmarks/train_speed.py --configs reference tv-cl denseseg-cl-compile
    PYTHONPATH=src python benchmarks/train_speed.py --ddp              # 2 processes against 1
    PYTHONPATH=src python benchmarks/train_speed.py --quick            # small crops, a minute

``--quick`` (a minute or two) uses 96x128 / 128x128 crops of random frames, batch 2, 2 steps.
``--ddp`` times denseseg's step (``--configs``, default ``denseseg denseseg-cl``) under
``torchrun --nproc_per_node 2`` (per-process batch ``--batch / 2``, ``--threads / 2`` threads
each) against 1 process with the whole batch (with ``--threads`` threads, and with 1), each
launched by torchrun in turn, and reports global images/s; ratios are to the first
configuration's 1-process launch (``denseseg``: the reference's step, see the main table).

On a machine shared with other jobs, torch's OpenMP threads spin-wait for each other while one
of them is descheduled: two threads can then be several times slower than one. Compare the
``1thread`` rows, and a run under ``OMP_WAIT_POLICY=PASSIVE`` (the header shows it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn

from denseseg.config import TrainCfg, load_config
from denseseg.engine.trainer import Trainer

DEFAULT_ROOT = "/work/shared/data/camvid"
RECIPE = "lraspp_mobilenet_v3_large_camvid"


@dataclass(frozen=True)
class Model:
    tv_name: str  # torchvision's builder
    crop: tuple[int, int]
    overrides: tuple[str, ...]  # on top of RECIPE
    aux: bool = False


MODELS = {
    "lraspp": Model("lraspp_mobilenet_v3_large", (288, 384), ()),
    "deeplab": Model(
        "deeplabv3_resnet50",
        (512, 512),
        (
            "model.name=deeplabv3_resnet50",
            "model.kwargs={aux_loss: true}",
            "optim.name=sgd",
            "optim.lr=0.01",
            "optim.momentum=0.9",
            "optim.weight_decay=0.0001",
            "loss.class_weights=null",
        ),
        aux=True,
    ),
}
QUICK_CROPS = {"lraspp": (96, 128), "deeplab": (128, 128)}


@dataclass(frozen=True)
class Variant:
    trainer: bool  # denseseg's Trainer (else torchvision's reference step)
    cl: bool = False
    bf16: bool = False
    compile: bool = False
    one_thread: bool = False

    def recipe(self) -> list[str]:
        """The recipe keys of this variant (denseseg's trainer)."""
        precision = "bf16" if self.bf16 else "fp32"
        return [
            f"train.precision={precision}",
            f"train.channels_last={str(self.cl).lower()}",
            f"train.compile={str(self.compile).lower()}",
        ]


def _variant(name: str) -> Variant:
    """``reference``, ``tv-FLAGS`` or ``denseseg[-FLAGS]`` (FLAGS: cl, bf16, compile, 1thread)."""
    words = name.split("-")
    flags = set(words[1:])
    known = flags <= {"cl", "bf16", "compile", "1thread"}
    if name != "reference" and not (known and words[0] in ("tv", "denseseg")):
        raise ValueError(name)
    return Variant(
        words[0] == "denseseg",
        "cl" in flags,
        "bf16" in flags,
        "compile" in flags,
        "1thread" in flags,
    )


def native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX-512 BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_configs(quick: bool) -> list[str]:
    names = ["reference", "tv-cl", "denseseg", "denseseg-cl", "denseseg-cl-1thread"]
    if native_bf16():
        names += ["tv-bf16-cl", "denseseg-bf16-cl"]
    if quick:
        names.remove("denseseg-cl-1thread")
    return names


# ---------------------------------------------------------------------------- data
def synthetic_camvid(folder: Path, n: int, size: tuple[int, int] = (360, 480)) -> Path:
    """``n`` random frames in CamVid's SegNet layout (train/, trainannot/, val/, valannot/)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (folder / split).mkdir(parents=True)
        (folder / f"{split}annot").mkdir()
        for i in range(n if split == "train" else 1):
            image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            labels = np.kron(rng.integers(0, 12, (size[0] // 24, size[1] // 24)), np.ones((24, 24)))
            Image.fromarray(image, "RGB").save(folder / split / f"syn_{i:03d}.png")
            Image.fromarray(labels.astype(np.uint8), "L").save(
                folder / f"{split}annot" / f"syn_{i:03d}.png"
            )
    return folder


class Setup:
    """The CamVid folder, the recipe overrides of one model and one batch of its crops."""

    def __init__(self, args: argparse.Namespace, tmp: Path, model: str, batch: int) -> None:
        self.args, self.tmp, self.model = args, tmp, MODELS[model]
        root = Path(args.root)
        if args.quick or not root.is_dir():  # --quick: 8 frames, read in no time
            root = tmp / "camvid"
            if not root.is_dir():
                synthetic_camvid(root, n=8)
        self.root, self.real = root, root == Path(args.root)
        crop = QUICK_CROPS[model] if args.quick else self.model.crop
        self.crop, self.batch_size = crop, batch
        self.overrides = [
            f"data.root={root}",
            "data.train_split=train",
            f"data.crop_size=[{crop[0]}, {crop[1]}]",
            f"data.batch_size={batch}",
            "data.num_workers=0",
            "train.device=cpu",
            "train.tensorboard=false",
            "train.progress=false",
            "train.precise_bn=0",
            "train.max_steps=100000",
            *self.model.overrides,
        ]
        self.batch: list[torch.Tensor] | None = None
        self.num_classes = 0  # the dataset's, known once a trainer is built
        self.runs = 0

    def trainer(self, extra: list[str]) -> Trainer:
        """denseseg's Trainer of this model with the ``extra`` recipe keys; the first one's
        class weights are passed on to the next (reading every mask again takes a minute)."""
        self.runs += 1
        out = self.tmp / f"run{self.runs}"
        cfg = load_config(RECIPE, [*self.overrides, *extra, f"train.out_dir={out}"])
        trainer = Trainer(cfg, out)
        weights = trainer.task.class_weights
        if weights is not None and not any("loss.class_w" in o for o in self.overrides):
            self.overrides.append(f"loss.class_weights={weights.tolist()}")
        if self.batch is None:
            data = trainer.data.dataset
            samples = [data[(i % len(data), i)] for i in range(self.batch_size)]
            self.batch = trainer.task.collate(samples)
            self.num_classes = trainer.data.raw.num_classes
        return trainer


# ---------------------------------------------------------------------------- the steps
def criterion(inputs: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """torchvision's reference: cross-entropy of each output, ``aux`` weighted 0.5."""
    ce = nn.functional.cross_entropy
    losses = {name: ce(x, target, ignore_index=255) for name, x in inputs.items()}
    if len(losses) == 1:
        return losses["out"]
    return losses["out"] + 0.5 * losses["aux"]


def reference_step(setup: Setup, v: Variant, max_steps: int = 100000) -> Callable[[], None]:
    """torchvision's references/segmentation/train.py step for the same model."""
    spec = setup.model
    build = getattr(torchvision.models.segmentation, spec.tv_name)
    extra = {"aux_loss": True} if spec.aux else {}
    model = build(weights=None, weights_backbone=None, num_classes=setup.num_classes, **extra)
    model.train()
    if v.cl:
        model = model.to(memory_format=torch.channels_last)
    groups = [
        {"params": [p for p in model.backbone.parameters() if p.requires_grad]},
        {"params": [p for p in model.classifier.parameters() if p.requires_grad]},
    ]
    if spec.aux:
        aux = [p for p in model.aux_classifier.parameters() if p.requires_grad]
        groups.append({"params": aux, "lr": 0.01 * 10})
    optimizer = torch.optim.SGD(groups, lr=0.01, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda x: (1 - x / max_steps) ** 0.9)
    forward = torch.compile(model) if v.compile else model
    images, targets = setup.batch[0], setup.batch[1]

    def step() -> None:
        x = images.contiguous(memory_format=torch.channels_last) if v.cl else images
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=v.bf16):
            output = forward(x)
            loss = criterion(output, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss.item()

    return step


def denseseg_step(setup: Setup, v: Variant) -> Callable[[], None]:
    trainer = setup.trainer(v.recipe())
    trainer.model.train()  # as Trainer.run does (building the predictor left it in eval mode)
    batch = setup.batch
    return lambda: trainer.run_step(batch)


def with_threads(step: Callable[[], None], threads: int) -> Callable[[], None]:
    def run() -> None:
        torch.set_num_threads(threads)
        step()

    return run


# ---------------------------------------------------------------------------- timing
@dataclass
class Timing:
    first: float  # seconds of the first step (allocations, torch.compile)
    times: list[float]
    ratios: list[float]  # reference's step time / this one's, round by round


def measure(runners: dict[str, Callable[[], None]], steps: int, warmup: int) -> dict[str, Timing]:
    """Warm each runner up, then ``steps`` rounds of one step each, in a rotating order."""
    result = {}
    for name, run in runners.items():
        start = time.perf_counter()
        run()
        result[name] = Timing(time.perf_counter() - start, [], [])
        for _ in range(warmup - 1):
            run()
    names = list(runners)
    for r in range(steps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            runners[name]()
            result[name].times.append(time.perf_counter() - start)
    ref = result[names[0]].times
    for t in result.values():
        t.ratios = [a / b for a, b in zip(ref, t.times, strict=True)]
    return result


def table(results: dict[str, Timing], batch: int) -> list[str]:
    lines = [
        "| configuration | first step s | ms/step (median) | images/s | ratio to reference |",
        "|---|---|---|---|---|",
    ]
    for name, t in results.items():
        med = statistics.median(t.times)
        lines.append(
            f"| {name} | {t.first:.1f} | {1000 * med:.0f} | {batch / med:.3g} | "
            f"{statistics.median(t.ratios):.2f}x |"
        )
    return lines


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(threads: int) -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, {threads} threads "
        f"({os.cpu_count()} CPUs), {cpu_model()}, capability "
        f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {native_bf16()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; load average at start: "
        f"{load}"
    )


# ---------------------------------------------------------------------------- single process
def check_memory(model: str, batch: int, crop: tuple[int, int]) -> None:
    """DeepLabV3-ResNet50 needs about 1.8 GB per 512x512 image to train: refuse a batch this
    machine cannot hold instead of driving it into the OOM killer."""
    if model != "deeplab":
        return
    need = 1.8e9 * batch * crop[0] * crop[1] / 512**2 + 1e9
    try:
        meminfo = Path("/proc/meminfo").read_text().split()
        avail = int(meminfo[meminfo.index("MemAvailable:") + 1]) * 1024
    except (OSError, ValueError):
        return
    if need > 0.8 * avail:
        sys.exit(
            f"train_speed: error: deeplab at batch {batch} needs about {need / 1e9:.0f} GB, "
            f"{avail / 1e9:.0f} GB are available; pass a smaller --batch"
        )


def run_model(args: argparse.Namespace, tmp: Path, model: str) -> list[str]:
    setup = Setup(args, tmp, model, args.batch)
    check_memory(model, args.batch, setup.crop)
    variants = {name: _variant(name) for name in ["reference", *args.configs]}
    runners: dict[str, Callable[[], None]] = {}
    for name, v in variants.items():  # denseseg's first: they make the batch
        if v.trainer:
            runners[name] = denseseg_step(setup, v)
    if setup.batch is None:
        setup.trainer([])
    for name, v in variants.items():
        if not v.trainer:
            runners[name] = reference_step(setup, v)
    runners = {
        name: with_threads(runners[name], 1 if variants[name].one_thread else args.threads)
        for name in variants
    }
    steps = args.steps or (8 if model == "lraspp" else 3)
    results = measure(runners, steps, args.warmup)
    source = "CamVid train crops" if setup.real else "random frames"
    h, w = setup.crop
    return [
        f"### {setup.model.tv_name}, {h}x{w} {source}, batch {setup.batch_size}, "
        f"{steps} interleaved steps per row after {args.warmup} warm-up\n",
        *table(results, setup.batch_size),
        "",
    ]


# ---------------------------------------------------------------------------- DDP
def ddp_worker(args: argparse.Namespace) -> None:
    """One process of a torchrun job: time ``run_step`` on this rank's share of the batch."""
    from denseseg.engine import distributed as dist

    torch.set_num_threads(args.threads)
    with dist.process_group(torch.device("cpu")), tempfile.TemporaryDirectory() as tmp:
        world = dist.world_size()
        setup = Setup(args, Path(tmp), args.models[0], args.batch // world)
        if args.class_weights:
            setup.overrides.append(f"loss.class_weights={args.class_weights}")
        step = denseseg_step(setup, _variant(args.configs[0]))
        for _ in range(args.warmup):
            step()
        times = []
        for _ in range(args.steps):
            dist.barrier()
            start = time.perf_counter()
            step()  # its loss all-reduce waits for every rank
            times.append(time.perf_counter() - start)
        if dist.is_main():
            Path(args.ddp_out).write_text(json.dumps(times))


def torchrun(args: argparse.Namespace, launch: tuple[str, int, int], out: Path, weights: str):
    """Global-batch step times of ``launch``: (configuration, processes, threads each)."""
    config, nproc, threads = launch
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", str(nproc), __file__, "--ddp-worker", "--ddp-out", str(out)]
    cmd += ["--models", args.models[0], "--configs", config, "--root", args.root]
    cmd += ["--batch", str(args.batch), "--threads", str(threads), "--steps", str(args.steps)]
    cmd += ["--warmup", str(args.warmup), "--class-weights", weights]
    cmd += ["--quick"] if args.quick else []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def run_ddp(args: argparse.Namespace, tmp: Path) -> list[str]:
    """For each configuration: 1 process with the whole batch (``--threads`` threads, and 1
    thread) and 2 with half each (``--threads / 2`` threads each); all launched in turn
    ``--rounds`` times; ratios to the first configuration's 1-process ``--threads`` launch."""
    setup = Setup(args, tmp, args.models[0], args.batch)
    trainer = setup.trainer([])  # the class weights, read once for every launch
    weights = trainer.task.class_weights
    weights = json.dumps(weights.tolist()) if weights is not None else ""
    layouts = dict.fromkeys([(1, args.threads), (1, 1), (2, max(1, args.threads // 2))])
    times = {(c, *layout): [] for c in args.configs for layout in layouts}
    for _ in range(args.rounds):
        for launch in times:
            times[launch] += torchrun(args, launch, tmp / "ddp.json", weights)
    lines = [
        f"### DDP: {MODELS[args.models[0]].tv_name}, {setup.crop[0]}x{setup.crop[1]}, global "
        f"batch {args.batch}, each launch {args.rounds}x in turn, {args.steps} steps after "
        f"{args.warmup} warm-up\n",
        "| configuration | processes x batch | threads each | ms/step (median) | "
        "global images/s | ratio |",
        "|---|---|---|---|---|---|",
    ]
    base = statistics.median(next(iter(times.values())))
    for (config, nproc, threads), t in times.items():
        med = statistics.median(t)
        lines.append(
            f"| {config} | {nproc} x {args.batch // nproc} | {threads} | {1000 * med:.0f} | "
            f"{args.batch / med:.3g} | {base / med:.2f}x |"
        )
    return [*lines, ""]


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["lraspp"])
    p.add_argument("--configs", nargs="+", default=None, help="rows besides the reference")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=None, help="timed rounds (lraspp 8, deeplab 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row, at least 1")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--root", default=DEFAULT_ROOT, help="CamVid folder (SegNet layout)")
    p.add_argument("--quick", action="store_true", help="random small crops, batch 2, 2 steps")
    p.add_argument("--ddp", action="store_true", help="2 processes against 1 (denseseg)")
    p.add_argument("--rounds", type=int, default=2, help="--ddp: launches of each")
    p.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ddp-out", help=argparse.SUPPRESS)
    p.add_argument("--class-weights", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.steps, args.warmup = 2, args.steps or 2, 1
        args.rounds = 1
    args.warmup = max(1, args.warmup)
    if args.ddp or args.ddp_worker:
        args.steps = args.steps or 4
        args.configs = args.configs or ["denseseg", "denseseg-cl"]
    args.configs = [c for c in args.configs or default_configs(args.quick) if c != "reference"]
    for name in args.configs:
        try:
            _variant(name)
        except ValueError:
            p.error(
                f"--configs {name}: use reference, tv-FLAGS or denseseg-FLAGS with FLAGS from "
                "cl, bf16, compile, 1thread joined by '-' (e.g. denseseg-cl-1thread)"
            )
    if args.ddp and any(not c.startswith("denseseg") for c in args.configs):
        p.error("--ddp times denseseg's trainer: give --configs denseseg[-FLAGS] only")
    if args.ddp and args.batch % 2:
        p.error("--ddp needs an even --batch (split over 2 processes)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args)
        return
    missing = {"precision", "channels_last", "compile"} - {f.name for f in fields(TrainCfg)}
    if missing:
        sys.exit(f"train_speed: error: this denseseg lacks train.{', train.'.join(missing)}")
    torch.set_num_threads(args.threads)
    print(header(args.threads) + "\n")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        if args.ddp:
            lines = run_ddp(args, tmp)
        else:
            lines = [line for model in args.models for line in run_model(args, tmp, model)]
    print("\n".join(lines))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average at end: {load}")


if __name__ == "__main__":
    main()
