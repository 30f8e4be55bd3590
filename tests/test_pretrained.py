"""Built-in models: pack a trained checkpoint, load it by name, the CLI doors, the errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import denseseg
from conftest import save_em_checkpoint, tiny_recipe
from denseseg.checkpoint import atomic_save
from denseseg.cli import main
from denseseg.config import load_config
from denseseg.engine.trainer import train
from denseseg.errors import CheckpointError, ConfigError
from denseseg.pretrained import ENV_VAR, list_builtin, load_builtin, pack, read_meta


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of a tiny U-Net trained for a few steps on the tiny folder dataset."""
    from conftest import write_folder_dataset

    tmp = tmp_path_factory.mktemp("trained")
    data = write_folder_dataset(tmp / "data")
    over = tiny_recipe(data, tmp / "run", **{"train.max_steps": 4, "train.eval_every": 4})
    train(load_config("unet_demo", over))
    return tmp / "run" / "last.pt"


@pytest.fixture
def builtin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Tests never write into the installed package: pack and load go through the variable.
    folder = tmp_path / "pretrained"
    monkeypatch.setenv(ENV_VAR, str(folder))
    return folder


def _images(n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 256, (3, 30 + 2 * i, 37), generator=g, dtype=torch.uint8) for i in range(n)
    ]


def test_pack_and_load_by_name_match_the_checkpoint(trained: Path, builtin_dir: Path) -> None:
    files = pack(trained, "tiny", extra_meta={"provenance": {"note": "test"}})
    assert files["weights"] == builtin_dir / "tiny.safetensors"
    assert "tiny" in list_builtin()
    stored = load_file(str(files["weights"]))
    assert all(v.dtype == torch.float16 for v in stored.values() if v.is_floating_point())

    meta = json.loads(files["json"].read_text())
    for key in ("model_name", "model_kwargs", "classes", "palette", "mean", "std"):
        assert meta[key], key
    assert meta["classes"] == ["background", "bright", "dark"]
    assert meta["in_channels"] == 3 and meta["ignore_index"] == 255
    assert meta["segmenter"] == {"mode": "whole", "tile_size": None, "tta": "none"}
    prov = meta["provenance"]
    assert prov["steps"] == 4 and prov["note"] == "test" and prov["checkpoint"] == "last.pt"
    assert prov["recipe"]["train"]["max_steps"] == 4 and "mIoU" in prov["val_metrics"]

    ref = denseseg.load_model(trained, device="cpu")
    seg = denseseg.load_model("tiny", device="cpu")
    assert all(p.dtype == torch.float32 for p in seg.model.parameters())
    assert seg.class_names == ref.class_names and seg.palette == ref.palette
    assert seg.meta["builtin"] == "tiny"
    images = _images()
    probs_ref = ref.predict_batch(images, return_probs=True)[1]
    labels, probs = seg.predict_batch(images, return_probs=True)
    for p, q in zip(probs, probs_ref):
        assert torch.allclose(p, q, atol=5e-3)  # float16 weights
    agree = np.mean(
        [(a == b).float().mean().item() for a, b in zip(labels, ref.predict_batch(images)[0])]
    )
    assert agree > 0.99


def test_fp32_pack_is_exact(trained: Path, tmp_path: Path) -> None:
    pack(trained, "exact", out_dir=tmp_path, fp16=False)
    seg = load_builtin("exact", device="cpu", directory=tmp_path)
    ref = denseseg.load_model(trained, device="cpu")
    for (k, a), b in zip(seg.model.state_dict().items(), ref.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_size_limit_is_refused_and_writes_nothing(trained: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"MiB.*more than the .* MiB"):
        pack(trained, "big", out_dir=tmp_path, max_bytes=1000)
    assert not list(tmp_path.glob("big.*"))


def test_unknown_name_and_bad_name(builtin_dir: Path, trained: Path) -> None:
    pack(trained, "known")
    with pytest.raises(
        CheckpointError, match=r"nosuch not found.*built-in model name \(.*\bknown\b.*\)"
    ):
        denseseg.load_model("nosuch")
    with pytest.raises(CheckpointError, match="not found"):
        denseseg.load_model("runs/missing/best.pt")
    with pytest.raises(CheckpointError, match="known"):
        read_meta("nosuch")
    with pytest.raises(ConfigError, match="lower case"):
        pack(trained, "Bad Name")


def test_segmenter_settings_travel_with_the_weights(tmp_path: Path) -> None:
    # A valid-padding U-Net packed for overlap-tile inference loads in that mode.
    save_em_checkpoint(tmp_path / "v.pt", "unet_valid", base_channels=4, depth=2)
    seg_opts = {"segmenter": {"mode": "overlap_tile", "tile_size": 60}}
    pack(tmp_path / "v.pt", "valid", out_dir=tmp_path, extra_meta=seg_opts)
    seg = load_builtin("valid", device="cpu", directory=tmp_path)
    assert seg.mode == "overlap_tile" and seg.tile_size == (60, 60)
    image = torch.randint(0, 256, (1, 90, 70), dtype=torch.uint8)
    whole = load_builtin("valid", device="cpu", directory=tmp_path, mode="whole")
    assert torch.allclose(seg.predict_proba(image), whole.predict_proba(image), atol=1e-5)
    with pytest.raises(ConfigError, match="mode"):
        pack(tmp_path / "v.pt", "bad", out_dir=tmp_path, extra_meta={"segmenter": {"mode": "x"}})


def test_cli_pack_then_predict_by_name(
    trained: Path, builtin_dir: Path, tmp_path: Path, capsys
) -> None:
    assert main(["pack", str(trained), "clitiny"]) == 0
    assert "clitiny.safetensors" in capsys.readouterr().out
    image = tmp_path / "in.png"
    Image.fromarray(np.full((20, 24, 3), 120, np.uint8)).save(image)
    out = tmp_path / "pred"
    assert (
        main(["predict", str(image), "--model", "clitiny", "--out", str(out), "--device", "cpu"])
        == 0
    )
    assert (out / "in.png").is_file()
    capsys.readouterr()
    assert main(["predict", str(image), "--model", "nosuch", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "clitiny" in err


@pytest.mark.parametrize("name", list_builtin())
def test_shipped_builtins_load_and_predict(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The models shipped in the package (not a test folder) load by name and segment an image.
    monkeypatch.delenv(ENV_VAR, raising=False)
    meta = read_meta(name)
    seg = denseseg.load_model(name, device="cpu")
    assert seg.class_names == meta["classes"] and seg.in_channels == meta["in_channels"]
    assert meta["provenance"]["steps"] and meta["dtype"] in ("float16", "float32")
    image = torch.randint(0, 256, (meta["in_channels"], 48, 40), dtype=torch.uint8)
    labels = seg.predict(image)
    assert labels.shape == (48, 40) and int(labels.max()) < len(meta["classes"])


def test_pack_with_precise_bn_recomputes_statistics_only(trained: Path, tmp_path: Path) -> None:
    files = pack(trained, "pbn", out_dir=tmp_path, fp16=False, precise_bn=2)
    stored = load_file(str(files["weights"]))
    saved = torch.load(trained, weights_only=True)["model"]
    stats = [k for k in saved if k.endswith(("running_mean", "running_var"))]
    assert stats and any(not torch.equal(stored[k], saved[k]) for k in stats)
    learned = [k for k in saved if k.endswith(("weight", "bias"))]
    assert all(torch.equal(stored[k], saved[k]) for k in learned)
    assert read_meta("pbn", tmp_path)["provenance"]["precise_bn_batches"] == 2
    bare = torch.load(trained, weights_only=True)
    bare.pop("config")
    atomic_save(bare, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="recipe"):
        pack(tmp_path / "bare.pt", "bare", out_dir=tmp_path, precise_bn=2)
