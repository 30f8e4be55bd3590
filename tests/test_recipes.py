"""Every built-in recipe loads, names a dataset format and a registered model, and its data
keys reach the augmentation pipeline (in the library and in the trainer)."""

from __future__ import annotations

import inspect

import pytest
import torch

from conftest import tiny_recipe, write_folder_dataset
from denseseg.config import RECIPE_DIR, load_config
from denseseg.data.elastic import ElasticDeformation
from denseseg.data.registry import DATASETS
from denseseg.data.transforms import (
    PhotoMetricDistortion,
    RandomCrop,
    RandomScale,
    build_eval_resize,
    build_transforms,
    default_mean_std,
)
from denseseg.models import get_model_entry, list_models

RECIPES = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
REQUIRED = [
    "fcn8s_voc",
    "unet_isbi2012",
    "deeplabv3plus_resnet101_cityscapes",
    "deeplabv3_resnet50_ade20k",
    "unet_camvid",
    "lraspp_mobilenet_v3_large_camvid",
]
IN_CHANNELS = {"isbi2012": 1}


def test_required_recipes_exist():
    assert set(REQUIRED) <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_names_dataset_and_model(name):
    cfg = load_config(name)  # every key is checked by the loader
    assert cfg.data.dataset in DATASETS
    assert name.endswith(f"_{cfg.data.dataset}")
    # <model>_<dataset>: the prefix is a registered name (a shorthand such as
    # deeplabv3plus_resnet101 for deeplabv3plus with backbone resnet101).
    assert name[: -len(cfg.data.dataset) - 1] in list_models()
    assert cfg.model.name in list_models()
    builder = get_model_entry(cfg.model.name).builder
    params = inspect.signature(builder).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        allowed = set(params) | {"weights", "backbone_weights"}
        assert set(cfg.model.kwargs) <= allowed, f"{name}: unknown model options"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_pipeline_builds_and_runs(name):
    dc = load_config(name).data
    channels = IN_CHANNELS.get(dc.dataset, 3)
    mean, std = default_mean_std(channels)
    transform = build_transforms(
        True, mean=dc.mean or mean, std=dc.std or std, ignore_index=255, **dc.transform_kwargs()
    )
    if dc.eval_resize is not None:
        build_eval_resize(dc.eval_resize)
    image = torch.randint(0, 256, (channels, 90, 120), dtype=torch.uint8)
    target = torch.randint(0, 2, (90, 120))
    torch.manual_seed(0)
    out, t = transform(image, target)
    assert out.dtype == torch.float32 and out.shape[0] == channels
    assert out.shape[1:] == t.shape
    if dc.crop_size:
        assert tuple(t.shape) == tuple(dc.crop_size)


def _steps(transform) -> dict[type, object]:
    return {type(s): s for s in transform.steps.transforms} if transform.steps else {}


def test_recipe_keys_reach_the_pipeline():
    ade = load_config("deeplabv3_resnet50_ade20k").data
    steps = _steps(build_transforms(True, **ade.transform_kwargs()))
    assert steps[RandomScale].base_size == (2048, 512)
    assert steps[RandomScale].scale_range == (0.5, 2.0)
    assert steps[RandomCrop].size == (512, 512) and steps[RandomCrop].cat_max_ratio == 0.75
    assert PhotoMetricDistortion in steps and ElasticDeformation not in steps
    isbi = load_config("unet_isbi2012").data
    steps = _steps(build_transforms(True, mean=[0.5], std=[0.5], **isbi.transform_kwargs()))
    elastic = steps[ElasticDeformation]
    assert (elastic.sigma, elastic.grid, elastic.p) == (10.0, 3, 1.0)
    assert RandomScale not in steps and steps[RandomCrop].size == (508, 508)
    fcn = load_config("fcn8s_voc").data
    assert _steps(build_transforms(True, **fcn.transform_kwargs())) == {}
    # Overrides reach it too.
    over = load_config(
        "unet_camvid",
        ["data.elastic={sigma: 4, grid: 5, p: 0.5}", "data.photometric=false",
         "data.base_size=360", "data.cat_max_ratio=0.9"],
    ).data  # fmt: skip
    steps = _steps(build_transforms(True, **over.transform_kwargs()))
    assert (steps[ElasticDeformation].sigma, steps[ElasticDeformation].grid) == (4.0, 5)
    assert steps[RandomScale].base_size == (360,) and steps[RandomCrop].cat_max_ratio == 0.9
    assert PhotoMetricDistortion not in steps


class _Stop(Exception):
    pass


def test_trainer_passes_recipe_keys(tmp_path, monkeypatch):
    """train() hands every augmentation key of the recipe to build_transforms (through the
    training data pipeline)."""
    import denseseg.engine.trainer as trainer
    import denseseg.engine.training_data as training_data

    root = write_folder_dataset(tmp_path / "data", n_train=2, n_val=1)
    seen = {}

    def fake_build(train, **kwargs):
        seen.update(kwargs, train=train)
        raise _Stop

    monkeypatch.setattr(training_data, "build_transforms", fake_build)
    cfg = load_config(
        None,
        [*tiny_recipe(root, tmp_path / "run"), "data.base_size=[64, 32]",
         "data.scale_range=[0.75, 1.25]", "data.cat_max_ratio=0.8", "data.photometric=true",
         "data.elastic={sigma: 5}", "data.eval_resize=24"],
    )  # fmt: skip
    with pytest.raises(_Stop):
        trainer.train(cfg)
    assert seen["train"] is True
    assert seen["base_size"] == [64, 32] and seen["scale_range"] == (0.75, 1.25)
    assert seen["cat_max_ratio"] == 0.8 and seen["photometric"] is True
    assert seen["elastic"] == {"sigma": 5} and seen["crop_size"] == (24, 24)
    assert seen["ignore_index"] == 255 and len(seen["mean"]) == 3
