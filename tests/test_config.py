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


def test_every_recipe_key_has_a_range_rule() -> None:
    import dataclasses

    from denseseg.config import _RULES, Config

    keys = {
        f"{sec.name}.{f.name}"
        for sec in dataclasses.fields(Config)
        for f in dataclasses.fields(getattr(Config(), sec.name))
    }
    assert keys == set(_RULES)
    load_config(None)  # the defaults pass their own rules


def test_override_names_the_recipe_when_a_section_is_not_a_mapping(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text("optim: 3\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: optim must be a mapping"):
        load_config(f, ["optim.lr=0.1"])
