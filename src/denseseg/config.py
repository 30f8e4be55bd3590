"""Recipes: one YAML file plus dotted overrides, resolved into typed dataclasses.

Only the CLI and this loader know about configs; library modules take plain keyword arguments.
A recipe has the sections ``model``, ``data``, ``loss``, ``optim``, ``schedule`` and ``train``;
every key is checked, so a typo ends in a :class:`~denseseg.errors.ConfigError` naming the key and
the file instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from denseseg.checkpoint.files import atomic_write
from denseseg.errors import ConfigError
from denseseg.yamlfile import check_size, load_yaml

RECIPE_DIR = Path(__file__).parent / "configs"


@dataclass
class ModelCfg:
    """Which registered model to build, and its builder's keyword arguments."""

    name: str = "unet"
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Local weights file to start from (a denseseg checkpoint or a state_dict).
    weights: str | None = None
    # Batch norm over the global batch (SyncBatchNorm) when training on several CUDA processes.
    sync_bn: bool = False


@dataclass
class DataCfg:
    """Dataset format, location, splits, augmentation and loader settings."""

    dataset: str = "folder"
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    # Training crop (h, w); None trains on whole images (they must share one size then).
    crop_size: list[int] | None = None
    # Random resize ratios: relative to each image's own size, or to base_size when given.
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    # mmseg's RandomResize scale: a short side, or [long, short] limits (aspect kept).
    base_size: int | list[int] | None = None
    # Re-draw the crop (up to 10 times) while one class covers this share of it; 1.0 = off.
    cat_max_ratio: float = 1.0
    hflip: bool = True
    # mmseg's PhotoMetricDistortion (brightness, contrast, saturation, hue).
    photometric: bool = False
    # U-Net's elastic deformation: true for the paper's {sigma: 10, grid: 3}, or a mapping
    # with sigma, grid, p, interpolation, padding_mode.
    elastic: bool | dict[str, Any] | None = None
    # Evaluation-time resize keeping the aspect ratio (short side or [long, short]); the
    # labels follow by nearest neighbour, so metrics are taken at that size. None = original.
    eval_resize: int | list[int] | None = None
    # Normalisation in 0-1 units; None picks ImageNet's for RGB and 0.5/0.5 for grayscale.
    mean: list[float] | None = None
    std: list[float] | None = None
    batch_size: int = 8
    eval_batch_size: int = 4
    num_workers: int = 0
    # Options of the built-in demo data (dataset: demo).
    demo: dict[str, Any] = field(default_factory=dict)
    # Reader options passed to the dataset (e.g. coco's target/category_map, voc's mask_dir).
    options: dict[str, Any] = field(default_factory=dict)

    def reader_options(self) -> dict[str, Any]:
        """Keyword arguments for the dataset reader: ``options`` (and the demo generator's
        settings for the ``demo`` dataset)."""
        demo = dict(self.demo) if self.dataset == "demo" else {}
        return {**demo, **self.options}

    def transform_kwargs(self) -> dict[str, Any]:
        """The training augmentation options as ``build_transforms`` keyword arguments
        (``mean``, ``std`` and ``ignore_index`` come from the dataset and are left out)."""
        return {
            "crop_size": tuple(self.crop_size) if self.crop_size else None,
            "scale_range": tuple(self.scale_range) if self.scale_range is not None else None,
            "base_size": self.base_size,
            "cat_max_ratio": self.cat_max_ratio,
            "hflip": self.hflip,
            "photometric": self.photometric,
            "elastic": self.elastic,
        }


@dataclass
class LossCfg:
    """Loss name (ce, dice, ce+dice, bce, bce+dice) and class weighting."""

    name: str = "ce"
    # None, "median_frequency" (SegNet) or an explicit list with one weight per class.
    class_weights: str | list[float] | None = None
    dice_weight: float = 1.0
    # Weight of the auxiliary head's loss for models that return "aux" (torchvision's 0.5).
    aux_weight: float = 0.5
    # U-Net's border weight map (loss "ce" only): null, "unet" (w0 = 10, sigma = 5 px) or a
    # mapping {name: unet, w0: ..., sigma: ...}; class_weights then give its w_c.
    weight_map: str | dict[str, Any] | None = None


@dataclass
class OptimCfg:
    """Optimiser and parameter groups."""

    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-4
    # Biases and normalisation parameters get no weight decay (the usual practice).
    no_decay_norm_bias: bool = True
    # Learning-rate multiplier for the backbone (parameters under ``model.backbone``).
    backbone_lr_mult: float = 1.0
    freeze_backbone: bool = False
    grad_clip: float | None = None


@dataclass
class ScheduleCfg:
    """Learning-rate schedule over training steps: linear warm-up, then poly, cosine, constant
    or multistep (``milestones`` as fractions of ``train.max_steps``, lr times ``gamma`` at each).
    """

    name: str = "poly"
    power: float = 0.9
    warmup_steps: int = 0
    warmup_factor: float = 0.001
    min_lr: float = 0.0
    milestones: list[float] = field(default_factory=list)
    gamma: float = 0.1


@dataclass
class TrainCfg:
    """Length of training, evaluation/checkpoint cadence, reproducibility, output folder."""

    max_steps: int = 1000
    eval_every: int = 200
    log_every: int = 20
    ckpt_every: int = 200
    keep_last: int = 2
    seed: int = 0
    deterministic: bool = False
    # Mixed precision (denseseg.engine.precision): auto is bfloat16 autocast on GPUs that have
    # it, float16 with a gradient scaler on older CUDA GPUs, float32 on a CPU.
    precision: str = "auto"
    amp: bool = True  # the old spelling: false makes precision auto mean fp32
    channels_last: bool = False
    compile: bool = False  # torch.compile of the model for the training steps
    accumulate: int = 1  # batches whose gradients are summed into one optimiser step
    ema: float | None = None  # decay of an exponential moving average of the weights
    device: str = "auto"
    out_dir: str = "runs/exp"
    tensorboard: bool = True
    progress: bool = True
    # Batches of training crops over which batch-norm statistics are recomputed before each
    # evaluation (PreciseBN, denseseg.engine.precise_bn); 0 keeps the running averages.
    precise_bn: int = 0


@dataclass
class Config:
    """A whole recipe."""

    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    schedule: ScheduleCfg = field(default_factory=ScheduleCfg)
    train: TrainCfg = field(default_factory=TrainCfg)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (what is saved next to a run and inside checkpoints)."""
        return dataclasses.asdict(self)


_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_class(name: str) -> type:
    return {
        "model": ModelCfg,
        "data": DataCfg,
        "loss": LossCfg,
        "optim": OptimCfg,
        "schedule": ScheduleCfg,
        "train": TrainCfg,
    }[name]


# ----------------------------------------------------------------------------- value rules
@dataclass(frozen=True)
class _Rule:
    """How one recipe key is checked: ``what`` completes "<key> must be ...", ``convert``
    returns the value to keep (``"1e-3"`` -> ``0.001``) or raises ValueError."""

    what: str
    convert: Callable[[Any], Any]


def _to_float(value: Any) -> float:
    # Strings too: PyYAML reads exponents without a dot (1e-3) as strings. NaN/inf refused.
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError
    number = float(value)
    if not math.isfinite(number):
        raise ValueError
    return number


def _to_int(value: Any) -> int:
    # Whole numbers written as floats (3.0, 1e5) become ints; 2.5 is refused.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)
    number = _to_float(value)
    if not number.is_integer():
        raise ValueError
    return int(number)


def _checked(convert: Callable[[Any], Any], ok: Callable[[Any], bool]) -> Callable[[Any], Any]:
    def run(value: Any) -> Any:
        out = convert(value)
        if not ok(out):
            raise ValueError
        return out

    return run


def _real(what: str = "", ok: Callable[[float], bool] = lambda x: True) -> _Rule:
    return _Rule(f"a number {what}".strip(), _checked(_to_float, ok))


def _int(minimum: int, below: int | None = None) -> _Rule:
    if below is None:
        return _Rule(f"an integer >= {minimum}", _checked(_to_int, lambda x: x >= minimum))
    return _Rule(
        f"an integer in [{minimum}, {below})", _checked(_to_int, lambda x: minimum <= x < below)
    )


def _list(what: str, item: _Rule, n: int | None = None, ok=lambda xs: True) -> _Rule:
    def run(value: Any) -> list:
        if not isinstance(value, (list, tuple)) or n not in (None, len(value)):
            raise ValueError
        return [item.convert(v) for v in value]

    return _Rule(what, _checked(run, ok))


def _optional(rule: _Rule, what: str = "") -> _Rule:
    return _Rule(what or f"null or {rule.what}", lambda v: None if v is None else rule.convert(v))


def _typed(what: str, *types: type, ok=lambda v: True) -> _Rule:
    # bool is a subclass of int, so isinstance alone would let true pass for an int.
    def fits(value: Any) -> bool:
        plain_bool = isinstance(value, bool) and bool not in types
        return not plain_bool and isinstance(value, types) and ok(value)

    return _Rule(what, _checked(lambda v: v, fits))


MAX_SIDE = 16384
"""Largest image side a resize may ask for (a 16384 x 16384 RGB float image takes 3 GiB)."""


def _size(value: Any) -> int | list[int]:
    # A short side, or [long, short] (mmseg's keep-ratio sizes).
    side = _int(1, MAX_SIDE + 1)
    if isinstance(value, (list, tuple)) and len(value) in (1, 2):
        return [side.convert(v) for v in value]
    return side.convert(value)


def _crop(value: Any) -> list[int]:
    # One integer is a square crop, as RandomCrop takes it.
    side = _int(1)
    if isinstance(value, (list, tuple)):
        return _list("", side, 2).convert(value)
    return [side.convert(value)] * 2


def _ascending(xs: list[float]) -> bool:
    return all(a < b for a, b in zip(xs, xs[1:]))


_TEXT = _typed("non-empty text", str, ok=lambda s: bool(s.strip()))
_MAPPING = _typed("a mapping ({key: value, ...})", dict)
_BOOL = _typed("true or false", bool)
_UNIT = _real("in [0, 1)", lambda x: 0 <= x < 1)
_NON_NEGATIVE = _real(">= 0", lambda x: x >= 0)
_POSITIVE = _real("> 0", lambda x: x > 0)
_DEVICES = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
_SIZE = _optional(
    _Rule("", _size), f"null, a short side or [long, short] (integers from 1 to {MAX_SIDE})"
)
_CLASS_WEIGHTS = _Rule(
    "", lambda v: v if isinstance(v, str) else _list("", _NON_NEGATIVE).convert(v)
)

_RULES: dict[str, _Rule] = {
    "model.name": _TEXT,
    "model.kwargs": _MAPPING,
    "model.weights": _optional(_TEXT, "null or a weights file path"),
    "model.sync_bn": _BOOL,
    "data.dataset": _TEXT,
    "data.root": _optional(_TEXT, "null or a folder path"),
    "data.train_split": _TEXT,
    "data.val_split": _TEXT,
    "data.crop_size": _optional(_Rule("", _crop), "null or [height, width] (integers >= 1)"),
    "data.scale_range": _optional(
        _list("two numbers 0 < low <= high", _POSITIVE, 2, lambda xs: xs[0] <= xs[1])
    ),
    "data.base_size": _SIZE,
    "data.eval_resize": _SIZE,
    "data.cat_max_ratio": _real("in (0, 1]", lambda x: 0 < x <= 1),
    "data.hflip": _BOOL,
    "data.photometric": _BOOL,
    "data.elastic": _optional(
        _typed("", bool, dict), "null, true, false or a mapping {sigma: ..., grid: ...}"
    ),
    "data.mean": _optional(_list("a list of numbers", _real(), ok=bool)),
    "data.std": _optional(_list("a list of numbers > 0", _POSITIVE, ok=bool)),
    "data.batch_size": _int(1),
    "data.eval_batch_size": _int(1),
    "data.num_workers": _int(0),
    "data.demo": _MAPPING,
    "data.options": _MAPPING,
    "loss.name": _TEXT,
    "loss.class_weights": _optional(
        _CLASS_WEIGHTS, "null, median_frequency or a list of numbers >= 0 (one per class)"
    ),
    "loss.dice_weight": _NON_NEGATIVE,
    "loss.aux_weight": _NON_NEGATIVE,
    "loss.weight_map": _optional(
        _typed("", str, dict), "null, unet or a mapping {name: unet, w0: ..., sigma: ...}"
    ),
    "optim.name": _TEXT,
    "optim.lr": _POSITIVE,
    "optim.momentum": _UNIT,
    "optim.nesterov": _BOOL,
    "optim.betas": _list("two numbers in [0, 1)", _UNIT, 2),
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.no_decay_norm_bias": _BOOL,
    "optim.backbone_lr_mult": _NON_NEGATIVE,
    "optim.freeze_backbone": _BOOL,
    # A negative value would flip the gradients (gradient ascent).
    "optim.grad_clip": _optional(_NON_NEGATIVE, "null, 0 (both: no clipping) or a number > 0"),
    "schedule.name": _TEXT,
    "schedule.power": _NON_NEGATIVE,
    "schedule.warmup_steps": _int(0),
    "schedule.warmup_factor": _real("in (0, 1]", lambda x: 0 < x <= 1),
    "schedule.min_lr": _NON_NEGATIVE,
    "schedule.milestones": _list(
        "a list of ascending fractions of train.max_steps, each in (0, 1)",
        _real("", lambda x: 0 < x < 1),
        ok=_ascending,
    ),
    "schedule.gamma": _POSITIVE,
    "train.max_steps": _int(1),
    "train.eval_every": _int(0),
    "train.log_every": _int(1),
    "train.ckpt_every": _int(0),
    "train.keep_last": _int(0),
    # Seeds are mixed with step counts into torch's 64-bit generator seeds.
    "train.seed": _int(0, 2**32),
    "train.deterministic": _BOOL,
    "train.amp": _BOOL,
    "train.precision": _typed(
        "one of auto, fp32, bf16, fp16", str, ok=lambda s: s in ("auto", "fp32", "bf16", "fp16")
    ),
    "train.channels_last": _BOOL,
    "train.compile": _BOOL,
    "train.accumulate": _int(1),
    "train.ema": _optional(_real("in (0, 1)", lambda x: 0 < x < 1), "null or a decay in (0, 1)"),
    "train.device": _typed(
        "one of auto, cpu, cuda, cuda:N, mps", str, ok=lambda s: bool(_DEVICES.fullmatch(s))
    ),
    "train.out_dir": _typed("a folder path (not empty)", str, ok=lambda s: bool(s.strip())),
    "train.tensorboard": _BOOL,
    "train.progress": _BOOL,
    "train.precise_bn": _int(0),
}
# Keys whose command-line value is kept as typed (train.out_dir=2024-01-01 is a folder name,
# not a date; data.root=010 is not the number 8).
_TEXT_KEYS = {"model.weights", "data.root", "data.train_split", "data.val_split", "train.out_dir"}


def _validate(cfg: Config, source: str, overridden: set[str]) -> None:
    """Check every key against its rule in :data:`_RULES` and keep the converted value."""
    for key, rule in _RULES.items():
        sec, name = key.split(".")
        obj = getattr(cfg, sec)
        value = getattr(obj, name)
        try:
            setattr(obj, name, rule.convert(value))
        except (ValueError, TypeError, OverflowError):
            origin = " (from the command line)" if key in overridden else ""
            raise ConfigError(
                f"{source}: {key} must be {rule.what}, got {reprlib.repr(value)}{origin}"
            ) from None


# ----------------------------------------------------------------------------- loading
def config_from_dict(
    raw: dict[str, Any], source: str = "<dict>", overridden: set[str] | None = None
) -> Config:
    """Build a :class:`Config` from a nested dict, rejecting unknown sections and keys and
    values outside their range (see :data:`_RULES`).

    Args:
        raw: ``{"model": {...}, "train": {...}, ...}``; missing sections take their defaults.
        source: the file name used in error messages.
        overridden: dotted keys set on the command line (error messages say so).
    """
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: a recipe must be a mapping of sections (model:, data:, ...), "
            f"got {type(raw).__name__}"
        )
    sections = {sec: _section(sec, values, source) for sec, values in raw.items()}
    cfg = Config(**sections)
    _validate(cfg, source, overridden or set())
    return cfg


def _section(sec: Any, values: Any, source: str) -> Any:
    if sec not in _SECTIONS:
        raise ConfigError(f"{source}: unknown section {sec!r}; sections are {', '.join(_SECTIONS)}")
    cls = _section_class(sec)
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section {sec!r} must be a mapping")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(
                f"{source}: unknown option {sec}.{key}; options of {sec!r} are "
                f"{', '.join(sorted(known))}"
            )
    return cls(**values)


def resolve_recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file path, or the name of a built-in recipe (``unet_demo``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    builtin = RECIPE_DIR / f"{Path(str(name_or_path)).stem}.yaml"
    if builtin.is_file() and path.suffix in ("", ".yaml") and len(path.parts) <= 1:
        return builtin
    names = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
    raise ConfigError(
        f"recipe {str(name_or_path)!r} not found; give a YAML file or one of: {names}"
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=0.02"`` -> (["optim", "lr"], 0.02); the value is parsed as YAML (path keys
    such as ``train.out_dir`` keep any text as typed)."""
    if "=" not in text:
        raise ConfigError(
            f"override {text!r} must look like section.key=value (e.g. optim.lr=0.02)"
        )
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {text!r}: the key must be section.key (e.g. train.max_steps)")
    text_key = ".".join(parts) in _TEXT_KEYS
    if text_key and not value.strip().startswith(("'", '"')):
        # A path as typed: runs/a #2 keeps its "#2", 2024-01-01 is no date ('...' is YAML).
        return parts, None if value.strip() in ("", "null", "~") else value
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except (yaml.YAMLError, RecursionError):
        parsed = value
    check_size(parsed, f"override {key.strip()}")
    return parts, parsed


def apply_overrides(
    raw: dict[str, Any], overrides: list[str], source: str = "<overrides>"
) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides to a nested dict (in place) and return it;
    ``source`` (the recipe file) is named when a key's parent is not a mapping."""
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for depth, p in enumerate(parts[:-1], 1):
            if node.get(p) is None:  # absent, or an empty section ("train:")
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(
                    f"{source}: {'.'.join(parts[:depth])} must be a mapping to take the "
                    f"override {text!r}, got {reprlib.repr(node)}"
                )
        node[parts[-1]] = value
    return raw


def _read_recipe(file: Path) -> dict[str, Any]:
    """The recipe file's mapping ({} for an empty file); one ConfigError naming it otherwise."""
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{file}: not UTF-8 text (byte {exc.start}); save the recipe as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the recipe ({exc.strerror})") from None
    raw = load_yaml(text, str(file))
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{file}: a recipe must be a mapping of sections (model:, data:, ...), "
            f"got {type(raw).__name__}"
        )
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a recipe file (or a built-in recipe name) and apply dotted overrides.

    Args:
        path: YAML file, built-in recipe name, or None for the defaults.
        overrides: ``["optim.lr=0.02", "train.max_steps=100"]``.

    Returns:
        The resolved :class:`Config`.
    """
    raw: dict[str, Any] = {}
    source = "<overrides>"
    if path is not None:
        file = resolve_recipe_path(path)
        source = str(file)
        raw = _read_recipe(file)
    overrides = list(overrides or [])
    apply_overrides(raw, overrides, source)
    overridden = {".".join(parse_override(o)[0][:2]) for o in overrides}
    return config_from_dict(raw, source, overridden)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (next to a run's outputs), atomically and without
    following a symbolic link planted at ``path``."""
    with atomic_write(path, "recipe copy") as fh:
        fh.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
