from pathlib import Path

import pytest

from denseseg.config import apply_overrides, load_config, parse_override, resolve_recipe_path
from denseseg.errors import ConfigError


def test_defaults_and_overrides(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text("model:\n  name: unet\n  kwargs: {base_channels: 8}\noptim:\n  lr: 1e-3\n")
    cfg = load_config(f, ["optim.lr=0.02", "train.max_steps=7", "data.crop_size=[8, 16]"])
    assert cfg.model.kwargs == {"base_channels": 8}
    assert cfg.optim.lr == 0.02 and cfg.train.max_steps == 7 and cfg.data.crop_size == [8, 16]
    # PyYAML reads "1e-3" as a string; the loader turns it into the float the user meant.
    assert load_config(f).optim.lr == pytest.approx(1e-3)


def test_unknown_key_names_the_key_and_file(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"r\.yaml.*optim\.lrr"):
        load_config(f)
    with pytest.raises(ConfigError, match="unknown section 'optimiser'"):
        load_config(None, ["optimiser.lr=1"])


def test_bad_values_and_paths(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train.max_steps must be an integer"):
        load_config(None, ["train.max_steps=ten"])
    with pytest.raises(ConfigError, match="must look like"):
        parse_override("optim.lr")
    with pytest.raises(ConfigError, match="not found"):
        resolve_recipe_path(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_builtin_recipes_load() -> None:
    for name in ("unet_demo", "pixelwise_demo"):
        cfg = load_config(name)
        assert cfg.data.dataset == "demo"
    assert apply_overrides({}, ["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


def test_every_recipe_key_has_a_rule() -> None:
    import dataclasses

    from denseseg.config import _RULES, KEY_RULES, Config

    keys = {
        f"{sec.name}.{f.name}"
        for sec in dataclasses.fields(Config)
        for f in dataclasses.fields(getattr(Config(), sec.name))
    }
    assert keys == set(KEY_RULES) and set(_RULES) <= keys
    load_config(None)  # the defaults pass their own rules


def test_override_names_the_recipe_when_a_section_is_not_a_mapping(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text("optim: 3\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: optim must be a mapping"):
        load_config(f, ["optim.lr=0.1"])


# ----------------------------------------------------------------- every value checked by type
@pytest.mark.parametrize(
    "override,expected",
    [
        ("data.crop_size=abc", "data.crop_size must be null or [height, width]"),
        ("optim.grad_clip=abc", "optim.grad_clip must be null, 0 (both: no clipping) or a number"),
        ("optim.lr=[0.1, 0.2]", "optim.lr must be a number > 0, got [0.1, 0.2]"),
        ("data.batch_size=[1, 2]", "data.batch_size must be an integer >= 1"),
        ("optim.name=sgdd", "optim.name must be one of sgd, adamw, adam, got 'sgdd'"),
        ("schedule.name=polyy", "schedule.name must be one of poly, cosine, constant, multistep"),
        ("loss.name=focal", "loss.name must be one of ce, dice, ce+dice, bce, bce+dice"),
        ("data.dataset=vocc", "data.dataset must be one of folder, demo, voc,"),
        ("data.hflip=null", "data.hflip must be true or false, got None"),
        ("optim.nesterov=1", "optim.nesterov must be true or false, got 1"),
        ("data.train_split=null", "data.train_split must be non-empty text, got None"),
        ("model.name=null", "model.name must be non-empty text, got None"),
        ("optim.betas=[0.9]", "optim.betas must be two numbers in [0, 1)"),
        ("data.mean=[0.5, x]", "data.mean must be null or a list of numbers"),
        ("model.kwargs={1: 2}", "model.kwargs must be a mapping ({key: value, ...})"),
        ("data.elastic={sigma: abc}", "data.elastic.sigma must be a number >= 0, got 'abc'"),
        ("data.elastic={grid: 2.5}", "data.elastic.grid must be an integer >= 2"),
        ("data.elastic={interpolation: nearest}", "data.elastic.interpolation must be one of"),
        ("data.elastic={sigmaa: 3}", "data.elastic.sigmaa is not an option; options are sigma,"),
        ("loss.weight_map=unett", "loss.weight_map must be null, unet or a mapping"),
        ("loss.weight_map={w0: -1}", "loss.weight_map.w0 must be a number >= 0, got -1"),
    ],
)
def test_wrong_value_is_one_line_naming_key_and_type(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("unet_demo", [override])
    message = str(info.value)
    assert "\n" not in message and "unet_demo.yaml: " in message
    assert expected in message and message.endswith("(from the command line)")


def test_values_become_their_declared_types(tmp_path: Path) -> None:
    # YAML 1.1 reads 1e-3 as a string; floats, ints and the options of mappings are converted.
    f = tmp_path / "r.yaml"
    f.write_text("optim:\n  grad_clip: 1e-3\ndata:\n  elastic: {sigma: 1e1, grid: 4.0}\n")
    cfg = load_config(f, ["loss.weight_map={w0: 2e1}", "model.kwargs={dropout: 1e-1, n: x1e3}"])
    assert type(cfg.optim.grad_clip) is float and cfg.optim.grad_clip == 1e-3
    assert cfg.data.elastic == {"sigma": 10.0, "grid": 4} and type(cfg.data.elastic["grid"]) is int
    assert cfg.loss.weight_map == {"w0": 20.0}
    # Free-form mappings (builder and reader options): exponent strings become numbers only.
    assert cfg.model.kwargs == {"dropout": 0.1, "n": "x1e3"}
    assert load_config(None, ["data.elastic=true"]).data.elastic is True
    assert load_config(None, ["loss.weight_map=unet"]).loss.weight_map == "unet"


def test_a_base_value_error_names_the_file_that_set_it(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("data:\n  batch_size: many\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\n")
    with pytest.raises(ConfigError, match=r"child\.yaml: data\.batch_size must be an integer"
                       r".*\(set in .*base\.yaml\)"):  # fmt: skip
        load_config(tmp_path / "child.yaml")


def test_annotation_rules() -> None:
    from typing import Any, Literal

    from denseseg.config import _annotation_rule

    def refuses(rule, value) -> bool:
        try:
            rule.convert(value)
        except (ValueError, TypeError):
            return True
        return False

    ints = _annotation_rule(list[int])
    assert ints.convert([1, 2.0, "3"]) == [1, 2, 3] and ints.what == "a list of integers"
    assert refuses(ints, [1.5]) and refuses(ints, 3) and refuses(ints, [True])
    maybe = _annotation_rule(float | None)
    assert maybe.convert(None) is None and maybe.convert("1e-3") == 1e-3
    assert maybe.what == "null or a number (float)" and refuses(maybe, "abc")
    choice = _annotation_rule(Literal["a", "b"])
    assert choice.convert("a") == "a" and refuses(choice, "c") and choice.what == "one of a, b"
    either = _annotation_rule(int | list[int])
    assert either.convert(3) == 3 and either.convert([3]) == [3] and refuses(either, "x")
    assert _annotation_rule(dict[str, Any]).convert({"a": "1e2"}) == {"a": 100.0}
    with pytest.raises(TypeError, match="no recipe rule"):
        _annotation_rule(set[int])


def test_choices_are_what_the_library_takes() -> None:
    import typing

    import torch

    from denseseg.config import _ELASTIC, _WEIGHT_MAP, DataCfg, LossCfg, OptimCfg, ScheduleCfg
    from denseseg.data import elastic, transforms
    from denseseg.data.registry import DATASETS
    from denseseg.engine.optim import build_optimizer, lr_factor
    from denseseg.losses import weight_map
    from denseseg.losses.build import LOSS_NAMES

    def choices(cls: type, name: str = "name") -> tuple:
        return typing.get_args(typing.get_type_hints(cls)[name])

    assert set(choices(DataCfg, "dataset")) == set(DATASETS)
    assert set(choices(LossCfg)) == set(LOSS_NAMES)
    model = torch.nn.Conv2d(1, 1, 1)
    for name in choices(OptimCfg):
        build_optimizer(model, name, lr=0.1, weight_decay=0.0)
    for name in choices(ScheduleCfg):
        assert 0 < lr_factor(3, 10, name=name, milestones=[0.5]) <= 1
    for rule, keys in ((_ELASTIC, transforms._ELASTIC_KEYS), (_WEIGHT_MAP, weight_map._KEYS)):
        with pytest.raises(ValueError, match="options are " + ", ".join(keys) + "$"):
            rule.convert({"nope": 1})
    for mode in elastic._INTERPOLATIONS:
        _ELASTIC.convert({"interpolation": mode})
    for mode in elastic._PADDING_MODES:
        _ELASTIC.convert({"padding_mode": mode})
