"""Recipes: one YAML file plus dotted overrides, resolved into typed dataclasses.

Only the CLI and this loader know about configs; library modules take plain keyword arguments.
A recipe has the sections ``model``, ``data``, ``loss``, ``optim``, ``schedule`` and ``train``;
every key is checked, so a typo ends in a :class:`~denseseg.errors.ConfigError` naming the key and
the file instead of being silently ignored. Every value is checked too, down to the items of its
lists and the options of its mappings: by the type its dataclass field declares (``int``,
``float``, ``list[float]``, ``X | None``, ``Literal[...]`` choices), and by a range rule in
:data:`_RULES` where the type alone says too little.

A recipe may start from another: a top-level ``base: other.yaml`` (a path relative to the
recipe's folder, or a built-in recipe such as ``unet_demo`` or ``_base/camvid.yaml``) is read
first and the recipe merged over it key by key: mappings (sections, ``model.kwargs``,
``data.options``, ...) merge recursively, any other value (lists too) is replaced, and the
command-line overrides come last, each replacing the whole value it names. A base may have a base
of its own; a cycle is refused. A key cannot be removed by a recipe, only set (to ``null`` where
that is allowed). :func:`save_config` writes the resolved recipe, which stands alone.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from denseseg.checkpoint.files import atomic_write
from denseseg.errors import ConfigError
from denseseg.yamlfile import check_size, load_yaml

RECIPE_DIR = Path(__file__).parent / "configs"
"""The built-in recipes (``*.yaml``); ``_base/`` beside them holds the partial recipes they
start from, which are not recipes to train alone."""
BASE_KEY = "base"
"""The top-level recipe key naming the recipe to start from."""


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

    dataset: Literal[
        "folder", "demo", "voc", "cityscapes", "ade20k", "camvid", "isbi2012", "coco"
    ] = "folder"
    root: str | None = None
    train_split: str = "train"
    # None: no evaluation during training (e.g. when every labelled image is a training one).
    val_split: str | None = "val"
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

    name: Literal["ce", "dice", "ce+dice", "bce", "bce+dice"] = "ce"
    # None, "median_frequency" (SegNet) or an explicit list with one weight per class.
    class_weights: str | list[float] | None = None
    dice_weight: float = 1.0
    # Weight of the auxiliary head's loss for models that return "aux" (torchvision's 0.5).
    aux_weight: float = 0.5
    # Online hard example mining (loss "ce"): only pixels whose probability of their true class
    # is below ohem_thresh count, at least ohem_min_kept per batch (the hardest ones); null: off.
    ohem_thresh: float | None = None
    ohem_min_kept: int = 100_000
    # U-Net's border weight map (loss "ce" only): null, "unet" (w0 = 10, sigma = 5 px) or a
    # mapping {name: unet, w0: ..., sigma: ...}; class_weights then give its w_c.
    weight_map: str | dict[str, Any] | None = None


@dataclass
class OptimCfg:
    """Optimiser and parameter groups."""

    name: Literal["sgd", "adamw", "adam"] = "sgd"
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

    name: Literal["poly", "cosine", "constant", "multistep"] = "poly"
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
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
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


def _typed(what: str, *kinds: type, ok=lambda v: True) -> _Rule:
    # bool is a subclass of int, so isinstance alone would let true pass for an int.
    def fits(value: Any) -> bool:
        plain_bool = isinstance(value, bool) and bool not in kinds
        return not plain_bool and isinstance(value, kinds) and ok(value)

    return _Rule(what, _checked(lambda v: v, fits))


def _choice(options: tuple[str, ...]) -> _Rule:
    """One of the words ``options`` (an enumeration such as ``optim.name``)."""
    return _typed(f"one of {', '.join(options)}", str, ok=lambda s: s in options)


class _OptionError(ValueError):
    """A bad option inside a mapping value: ``message`` continues "<key>." (``sigma must be
    ...``), so the error names the whole dotted path."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _options(what: str, rules: dict[str, _Rule]) -> _Rule:
    """A mapping whose keys are among ``rules``, each value checked by its own rule."""

    def run(value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ValueError
        out = {}
        for key, item in value.items():
            if key not in rules:
                raise _OptionError(f"{key} is not an option; options are {', '.join(rules)}")
            try:
                out[key] = rules[key].convert(item)
            except (ValueError, TypeError, OverflowError):
                raise _OptionError(
                    f"{key} must be {rules[key].what}, got {reprlib.repr(item)}"
                ) from None
        return out

    return _Rule(what, run)


def _flag_or(flag: _Rule, options: _Rule, what: str) -> _Rule:
    """null, a plain value checked by ``flag`` (``true``, ``unet``), or a checked mapping."""

    def run(value: Any) -> Any:
        if value is None:
            return None
        return options.convert(value) if isinstance(value, dict) else flag.convert(value)

    return _Rule(what, run)


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


# A number with an exponent that YAML 1.2 reads as a float and PyYAML (YAML 1.1) as a string.
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _exponents_as_floats(value: Any) -> Any:
    """``value`` with every string such as ``"1e-3"`` in it (at any depth) made a float."""
    if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {k: _exponents_as_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_exponents_as_floats(v) for v in value]
    return value


def _mapping(value: Any) -> dict[str, Any]:
    # A free-form mapping (builder or reader keyword arguments): text keys, any values.
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError
    return _exponents_as_floats(value)


_TEXT = _typed("non-empty text", str, ok=lambda s: bool(s.strip()))
_MAPPING = _Rule("a mapping ({key: value, ...})", _mapping)
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
# The options of data.elastic (denseseg.data.elastic.ElasticDeformation) and of loss.weight_map
# (denseseg.losses.weight_map.parse_weight_map); tests keep them equal to what those take.
_ELASTIC = _options(
    "",
    {
        "sigma": _NON_NEGATIVE,
        "grid": _int(2),
        "p": _real("in [0, 1]", lambda x: 0 <= x <= 1),
        "interpolation": _choice(("bilinear", "bicubic")),
        "padding_mode": _choice(("reflection", "border", "zeros")),
    },
)
_WEIGHT_MAP = _options(
    "",
    {
        "name": _choice(("unet",)),
        "w0": _NON_NEGATIVE,
        "sigma": _NON_NEGATIVE,
        "foreground": _int(0),
    },
)

_RULES: dict[str, _Rule] = {
    # Ranges and shapes that a key's type alone does not say; every other key is checked by the
    # type its dataclass field declares (see _annotation_rule).
    "model.weights": _optional(_TEXT, "null or a weights file path"),
    "data.root": _optional(_TEXT, "null or a folder path"),
    "data.crop_size": _optional(_Rule("", _crop), "null or [height, width] (integers >= 1)"),
    "data.scale_range": _optional(
        _list("two numbers 0 < low <= high", _POSITIVE, 2, lambda xs: xs[0] <= xs[1])
    ),
    "data.base_size": _SIZE,
    "data.eval_resize": _SIZE,
    "data.cat_max_ratio": _real("in (0, 1]", lambda x: 0 < x <= 1),
    "data.elastic": _flag_or(
        _BOOL, _ELASTIC, "null, true, false or a mapping {sigma: ..., grid: ...}"
    ),
    "data.mean": _optional(_list("a list of numbers", _real(), ok=bool)),
    "data.std": _optional(_list("a list of numbers > 0", _POSITIVE, ok=bool)),
    "data.batch_size": _int(1),
    "data.eval_batch_size": _int(1),
    "data.num_workers": _int(0),
    "loss.class_weights": _optional(
        _CLASS_WEIGHTS, "null, median_frequency or a list of numbers >= 0 (one per class)"
    ),
    "loss.dice_weight": _NON_NEGATIVE,
    "loss.aux_weight": _NON_NEGATIVE,
    "loss.ohem_thresh": _optional(_real("in (0, 1]", lambda x: 0 < x <= 1), "null or in (0, 1]"),
    "loss.ohem_min_kept": _int(1),
    "loss.weight_map": _flag_or(
        _choice(("unet",)), _WEIGHT_MAP, "null, unet or a mapping {name: unet, w0: ..., sigma: ...}"
    ),
    "optim.lr": _POSITIVE,
    "optim.momentum": _UNIT,
    "optim.betas": _list("two numbers in [0, 1)", _UNIT, 2),
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.backbone_lr_mult": _NON_NEGATIVE,
    # A negative value would flip the gradients (gradient ascent).
    "optim.grad_clip": _optional(_NON_NEGATIVE, "null, 0 (both: no clipping) or a number > 0"),
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
    "train.accumulate": _int(1),
    "train.ema": _optional(_real("in (0, 1)", lambda x: 0 < x < 1), "null or a decay in (0, 1)"),
    "train.device": _typed(
        "one of auto, cpu, cuda, cuda:N, mps", str, ok=lambda s: bool(_DEVICES.fullmatch(s))
    ),
    "train.out_dir": _typed("a folder path (not empty)", str, ok=lambda s: bool(s.strip())),
    "train.precise_bn": _int(0),
}
# Keys whose command-line value is kept as typed (train.out_dir=2024-01-01 is a folder name,
# not a date; data.root=010 is not the number 8).
_TEXT_KEYS = {"model.weights", "data.root", "data.train_split", "data.val_split", "train.out_dir"}

_PLAIN: dict[Any, _Rule] = {
    bool: _BOOL,
    int: _Rule("an integer", _to_int),
    float: _Rule("a number (float)", _to_float),
    str: _TEXT,
    Any: _Rule("any value", lambda v: v),
}
_PLURAL = {bool: "true/false values", int: "integers", float: "numbers", str: "texts"}


def _annotation_rule(annotation: Any) -> _Rule:
    """The check a dataclass field's type asks for: ``bool``, ``int`` (whole floats become
    ints), ``float`` (ints and exponent strings such as ``"1e-3"`` become floats), ``str`` (not
    empty), ``Literal[...]`` (one of the choices), ``list[X]``, ``dict[str, Any]``, unions and
    ``X | None``.

    Raises:
        TypeError: an annotation no rule is written for (a new field needs one here or in
            :data:`_RULES`; the module does not import otherwise).
    """
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation in _PLAIN:
        return _PLAIN[annotation]
    if origin is Literal:
        return _choice(args)
    if origin is list:
        item = _annotation_rule(args[0])
        return _list(f"a list of {_PLURAL.get(args[0], f'items each {item.what}')}", item)
    if origin is dict and args[:1] in ((), (str,)):
        return _MAPPING
    if origin in (Union, types.UnionType):
        rules = [_annotation_rule(a) for a in args if a is not type(None)]
        rule = rules[0] if len(rules) == 1 else _first_fit(rules)
        return _optional(rule) if type(None) in args else rule
    raise TypeError(f"no recipe rule for the annotation {annotation!r}")


def _first_fit(rules: list[_Rule]) -> _Rule:
    """The value as the first of ``rules`` that takes it converts it (a union's members)."""

    def run(value: Any) -> Any:
        for rule in rules:
            try:
                return rule.convert(value)
            except (ValueError, TypeError, OverflowError):
                continue
        raise ValueError

    return _Rule(" or ".join(r.what for r in rules), run)


def _key_rules() -> dict[str, _Rule]:
    """Every ``section.key`` with its rule: the one in :data:`_RULES`, else its type's."""
    rules = {}
    for section in dataclasses.fields(Config):
        cls = _section_class(section.name)
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{section.name}.{f.name}"
            rules[key] = _RULES.get(key) or _annotation_rule(hints[f.name])
    stray = set(_RULES) - set(rules)
    if stray:
        raise TypeError(f"_RULES names keys no section has: {sorted(stray)}")
    return rules


KEY_RULES: dict[str, _Rule] = _key_rules()
"""Every recipe key (``optim.lr``) and how its value is checked (``what`` says it in words)."""


def _validate(
    cfg: Config, source: str, overridden: set[str], origins: dict[str, str] | None = None
) -> None:
    """Check every key against its rule in :data:`KEY_RULES` and keep the converted value;
    the error names the key, the value, and where it was set when that is not ``source``."""
    for key, rule in KEY_RULES.items():
        sec, name = key.split(".")
        obj = getattr(cfg, sec)
        value = getattr(obj, name)
        try:
            setattr(obj, name, rule.convert(value))
        except (ValueError, TypeError, OverflowError) as exc:
            where = (origins or {}).get(key, source)
            origin = f" (set in {where})" if where != source else ""
            if key in overridden:
                origin = " (from the command line)"
            if isinstance(exc, _OptionError):
                raise ConfigError(f"{source}: {key}.{exc.message}{origin}") from None
            raise ConfigError(
                f"{source}: {key} must be {rule.what}, got {reprlib.repr(value)}{origin}"
            ) from None


# ----------------------------------------------------------------------------- loading
def config_from_dict(
    raw: dict[str, Any],
    source: str = "<dict>",
    overridden: set[str] | None = None,
    origins: dict[str, str] | None = None,
) -> Config:
    """Build a :class:`Config` from a nested dict, rejecting unknown sections and keys and
    values of the wrong type or outside their range (see :data:`KEY_RULES`).

    Args:
        raw: ``{"model": {...}, "train": {...}, ...}``; missing sections take their defaults.
        source: the file name used in error messages.
        overridden: dotted keys set on the command line (error messages say so).
        origins: ``section.key`` -> the file that set it, when not ``source`` (a base recipe).
    """
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: a recipe must be a mapping of sections (model:, data:, ...), "
            f"got {type(raw).__name__}"
        )
    checked = {sec: _section(sec, values, source) for sec, values in raw.items()}
    cfg = Config(**{sec: _section_class(sec)(**values) for sec, values in checked.items()})
    _validate(cfg, source, overridden or set(), origins)
    check_combinations(cfg, source)
    return cfg


def check_combinations(cfg: Config, source: str = "<config>") -> None:
    """The checks that span keys, each valid alone: made when a recipe is read (so that
    ``--print-config`` refuses what training would) and again when a task is built from a
    :class:`Config` made in Python."""
    loss = cfg.loss
    if loss.ohem_thresh is not None and (loss.name != "ce" or loss.weight_map):
        raise ConfigError(
            f"{source}: loss.ohem_thresh needs loss.name ce without loss.weight_map "
            f"(got {loss.name!r}{' with a weight map' if loss.weight_map else ''})"
        )


def _section(sec: Any, values: Any, source: str) -> dict[str, Any]:
    """The options of section ``sec`` ({} for an empty one), every key a known one."""
    if sec not in _SECTIONS:
        raise ConfigError(f"{source}: unknown section {sec!r}; sections are {', '.join(_SECTIONS)}")
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(
            f"{source}: {sec} must be a mapping of options ({sec}: {{key: value, ...}}), "
            f"got {reprlib.repr(values)}"
        )
    known = {f.name for f in dataclasses.fields(_section_class(sec))}
    for key in values:
        if key not in known:
            raise ConfigError(
                f"{source}: unknown option {sec}.{key}; options of {sec!r} are "
                f"{', '.join(sorted(known))}"
            )
    return values


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


def merge_recipes(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``, key by key: where both hold a mapping the two are merged the
    same way (sections, ``model.kwargs``, ``data.options``, ...); any other value of ``child``,
    lists and ``null`` included, replaces the base's. Neither argument is changed."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_recipes(out[key], value)
        else:
            out[key] = value
    return out


def _base_path(value: Any, file: Path) -> Path:
    """The file a recipe's ``base:`` names: a path relative to the recipe's folder (or an
    absolute one), else a built-in recipe (``unet_demo``, ``_base/camvid.yaml``)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"{file}: base must be the file name of a recipe to start from, "
            f"got {reprlib.repr(value)}"
        )
    given = Path(value)
    names = [given] if given.suffix else [given, given.with_name(f"{given.name}.yaml")]
    for folder in (file.parent, RECIPE_DIR):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    raise ConfigError(
        f"{file}: base recipe {value!r} not found (neither in {file.parent} nor a built-in recipe)"
    )


def read_recipe(file: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """A recipe file with its ``base`` recipes merged in (:func:`merge_recipes`, the recipe
    last), not yet checked for values.

    Returns:
        The merged sections, and for each ``section.key`` the file that set it.

    Raises:
        ConfigError: naming the file: unreadable, not a mapping of known sections and keys, a
            base that is not found, or bases that lead back to a recipe already read.
    """
    chain: list[tuple[Path, dict[str, Any]]] = []
    file = Path(file)
    while True:
        if any(file.resolve() == seen.resolve() for seen, _ in chain):
            loop = " -> ".join(str(f) for f in [*(f for f, _ in chain), file])
            raise ConfigError(f"{chain[0][0]}: its base recipes form a cycle: {loop}")
        raw = _read_recipe(file)
        base = raw.pop(BASE_KEY, None)
        chain.append((file, {sec: _section(sec, v, str(file)) for sec, v in raw.items()}))
        if base is None:
            break
        file = _base_path(base, file)
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for path, raw in reversed(chain):
        merged = merge_recipes(merged, raw)
        origins.update({f"{sec}.{key}": str(path) for sec, v in raw.items() for key in v})
    return merged, origins


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a recipe file (or a built-in recipe name), its base recipes merged in, and apply
    dotted overrides last.

    Args:
        path: YAML file, built-in recipe name, or None for the defaults.
        overrides: ``["optim.lr=0.02", "train.max_steps=100"]``; each replaces the whole value
            it names (``model.kwargs={depth: 3}`` drops the other kwargs,
            ``model.kwargs.depth=3`` sets one).

    Returns:
        The resolved :class:`Config`.
    """
    raw: dict[str, Any] = {}
    origins: dict[str, str] = {}
    source = "<overrides>"
    if path is not None:
        file = resolve_recipe_path(path)
        source = str(file)
        raw, origins = read_recipe(file)
    overrides = list(overrides or [])
    apply_overrides(raw, overrides, source)
    overridden = {".".join(parse_override(o)[0][:2]) for o in overrides}
    return config_from_dict(raw, source, overridden, origins)


def config_yaml(cfg: Config) -> str:
    """The resolved recipe as YAML text: every key, no ``base``; a file that stands alone."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (next to a run's outputs), atomically and without
    following a symbolic link planted at ``path``."""
    with atomic_write(path, "recipe copy") as fh:
        fh.write(config_yaml(cfg).encode())
