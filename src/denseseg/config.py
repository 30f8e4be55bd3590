"""Recipes: one YAML file plus dotted overrides, resolved into typed dataclasses.

Only the CLI and this loader know about configs; library modules take plain keyword arguments.
A recipe has the sections ``model``, ``data``, ``loss``, ``optim``, ``schedule`` and ``train``;
every key is checked, so a typo ends in a :class:`~denseseg.errors.ConfigError` naming the key and
the file instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from denseseg.errors import ConfigError

RECIPE_DIR = Path(__file__).parent / "configs"


@dataclass
class ModelCfg:
    """Which registered model to build, and its builder's keyword arguments."""

    name: str = "unet"
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Local weights file to start from (a denseseg checkpoint or a state_dict).
    weights: str | None = None


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
    amp: bool = True
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


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    """Build a :class:`Config` from a nested dict, rejecting unknown sections and keys.

    Args:
        raw: ``{"model": {...}, "train": {...}, ...}``; missing sections take their defaults.
        source: the file name used in error messages.
    """
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: a recipe must be a mapping of sections, got {type(raw).__name__}"
        )
    sections: dict[str, Any] = {}
    for sec, values in raw.items():
        if sec not in _SECTIONS:
            raise ConfigError(
                f"{source}: unknown section {sec!r}; sections are {', '.join(_SECTIONS)}"
            )
        cls = _section_class(sec)
        values = values or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {sec!r} must be a mapping")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(
                    f"{source}: unknown option {sec}.{key}; options of {sec!r} are "
                    f"{', '.join(sorted(known))}"
                )
        sections[sec] = cls(**values)
    cfg = Config(**sections)
    _check_types(cfg, source)
    return cfg


def _check_types(cfg: Config, source: str) -> None:
    """Catch the common slip of a string where a number belongs (``lr: 1e-3`` is fine in YAML 1.2
    but PyYAML reads it as a string)."""
    for sec in dataclasses.fields(cfg):
        obj = getattr(cfg, sec.name)
        defaults = type(obj)()
        for f in dataclasses.fields(obj):
            val, ref = getattr(obj, f.name), getattr(defaults, f.name)
            if isinstance(ref, bool) and not isinstance(val, bool):
                raise ConfigError(
                    f"{source}: {sec.name}.{f.name} must be true or false, got {val!r}"
                )
            if isinstance(ref, float) and isinstance(val, str):
                try:
                    setattr(obj, f.name, float(val))
                except ValueError:
                    raise ConfigError(
                        f"{source}: {sec.name}.{f.name} must be a number, got {val!r}"
                    ) from None
            elif isinstance(ref, int) and not isinstance(ref, bool) and not isinstance(val, int):
                raise ConfigError(f"{source}: {sec.name}.{f.name} must be an integer, got {val!r}")


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
    """``"optim.lr=0.02"`` -> (["optim", "lr"], 0.02); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(
            f"override {text!r} must look like section.key=value (e.g. optim.lr=0.02)"
        )
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {text!r}: the key must be section.key (e.g. train.max_steps)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides to a nested dict (in place) and return it."""
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {p!r} is not a section")
        node[parts[-1]] = value
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
        try:
            raw = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0] if str(exc) else "parse error"
            raise ConfigError(f"{source}: not valid YAML ({first})") from None
    apply_overrides(raw, list(overrides or []))
    return config_from_dict(raw, source)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (next to a run's outputs)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
