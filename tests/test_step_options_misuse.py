"""Misuse of the training-step and multi-process options (train.precision, channels_last,
accumulate, ema, model.sync_bn; --ema on eval/predict/pack; --nproc), in-process through
``denseseg.cli.main``: one clear line naming the key, option or file, nothing of the user's
changed. Written by a hostile probe; the cases whose docstring says "BUG" failed before their
fix. No case starts a second process: the ``--nproc`` cases replace torchrun's launcher by a
recorder, since what they check (that a command refuses before launching) must hold without any
worker.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import tiny_recipe, write_folder_dataset
from denseseg.checkpoint import atomic_save, load_checkpoint
from denseseg.cli import main
from denseseg.engine import distributed
from test_bad_input import LOCK, run_cli, snapshot


def _train(data: Path, out: Path, *extra: str) -> None:
    assert main(["train", "unet_demo", *tiny_recipe(data, out), *extra]) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny dataset, a run that kept an EMA (decay 0.9) and one that did not."""
    tmp = tmp_path_factory.mktemp("probe13")
    data = write_folder_dataset(tmp / "data")
    _train(data, tmp / "ema", "train.ema=0.9")
    _train(data, tmp / "plain")
    return {"data": data, "ema": tmp / "ema", "plain": tmp / "plain", "tmp": tmp}


def _copy_run(runs: dict[str, Path], name: str, dest: Path) -> Path:
    shutil.copytree(runs[name], dest)
    return dest


# =================================================================================================
# Guards: recipe values of the new keys end in one line naming the key
# =================================================================================================

BAD_VALUES = [
    ("train.precision=FP32", "train.precision"),
    ("train.precision=null", "train.precision"),
    ("train.precision=fp16", "train.precision"),  # CPU: fp16 needs CUDA
    ('train.channels_last="true"', "train.channels_last"),
    ("train.compile=1", "train.compile"),
    ("train.accumulate=0", "train.accumulate"),
    ("train.accumulate=1.5", "train.accumulate"),
    ("train.accumulate=7", "train.accumulate"),  # more batches per step than the 6 images
    ("train.accumulate=1e30", "train.accumulate"),
    ("train.ema=1.0", "train.ema"),
    ("train.ema=.nan", "train.ema"),
    ("train.ema=true", "train.ema"),
    ("train.ema=0.9999999999999999999", "train.ema"),  # rounds to 1.0
    ("model.sync_bn=1", "model.sync_bn"),
    ("model.sync_bn=true", "model.sync_bn"),  # CPU: no SyncBatchNorm kernel
]


@pytest.mark.parametrize(
    ("override", "key"), BAD_VALUES, ids=[o.replace(".", "_") for o, _ in BAD_VALUES]
)
def test_bad_value_of_a_new_key_is_one_line(runs, tmp_path, capsys, override, key) -> None:
    out = tmp_path / "run"
    line = run_cli(["train", "unet_demo", *tiny_recipe(runs["data"], out), override], capsys)
    assert key in line
    assert not (out / "last.pt").exists()


# =================================================================================================
# Guards: --ema where there is no moving average
# =================================================================================================


def _ema_commands(model: str, runs: dict[str, Path], tmp: Path) -> dict[str, list[str]]:
    image = str(runs["data"] / "images" / "val_000.png")
    return {
        "eval": ["eval", "--model", model, "--root", str(runs["data"]), "--out", str(tmp / "ev")],
        "predict": ["predict", image, "--model", model, "--out", str(tmp / "pr")],
    }


@pytest.mark.parametrize("command", ["eval", "predict"])
@pytest.mark.parametrize("source", ["builtin_camvid", "checkpoint_without_ema"])
def test_ema_without_a_moving_average_is_one_line(runs, tmp_path, capsys, command, source):
    model = "camvid" if source == "builtin_camvid" else str(runs["plain"] / "last.pt")
    args = _ema_commands(model, runs, tmp_path)[command]
    line = run_cli([*args, "--ema", "--device", "cpu"], capsys)
    assert ("camvid" in line) if source == "builtin_camvid" else (model in line)
    assert not (tmp_path / "ev").exists() and not (tmp_path / "pr").exists()


@pytest.mark.parametrize("damage", ["ema_is_text", "ema_model_is_a_list", "ema_model_misfits"])
def test_damaged_ema_entry_is_one_line_naming_the_file(runs, tmp_path, capsys, damage) -> None:
    ckpt = load_checkpoint(runs["ema"] / "last.pt")
    first = next(iter(ckpt["model"]))
    misfit = {first: ckpt["model"][first][:1]}
    ckpt["ema"] = {
        "ema_is_text": "junk",
        "ema_model_is_a_list": {"decay": 0.9, "updates": 8, "model": [1, 2]},
        "ema_model_misfits": {"decay": 0.9, "updates": 8, "model": misfit},
    }[damage]
    path = tmp_path / "damaged.pt"
    atomic_save(ckpt, path)
    args = ["pack", str(path), "damaged", "--out", str(tmp_path / "packed"), "--ema"]
    assert str(path) in run_cli(args, capsys)
    assert not (tmp_path / "packed").exists()


# =================================================================================================
# BUGS
# =================================================================================================


def _forge_world(run: Path, world: int, global_batch: int) -> None:
    """last.pt as a run on ``world`` processes with ``global_batch`` would have written it."""
    ckpt = load_checkpoint(run / "last.pt")
    ckpt["world_size"], ckpt["global_batch"] = world, global_batch
    atomic_save(ckpt, run / "last.pt")


def test_resume_with_the_same_global_batch_through_accumulation_works(runs, tmp_path) -> None:
    """Guard: 2 processes x batch 2 resume on 1 process as batch 2 x accumulate 2."""
    run = _copy_run(runs, "plain", tmp_path / "run")
    _forge_world(run, 2, 4)
    extra = ["train.accumulate=2", "train.max_steps=10"]
    assert main(["train", "unet_demo", *tiny_recipe(runs["data"], run), *extra, "--resume"]) == 0
    assert load_checkpoint(run / "last.pt")["step"] == 10


def test_global_batch_refusal_names_the_recipe_batch_and_accumulate(runs, tmp_path, capsys):
    """BUG F1: with train.accumulate=2 and data.batch_size=1, the line called the batch
    "data.batch_size=2" and hinted "set data.batch_size=4" (which makes 8 with accumulate 2)."""
    run = _copy_run(runs, "plain", tmp_path / "run")
    _forge_world(run, 2, 4)
    before = snapshot(run, ignore=LOCK)
    extra = ["train.accumulate=2", "data.batch_size=1", "train.max_steps=10"]
    line = run_cli(
        ["train", "unet_demo", *tiny_recipe(runs["data"], run), *extra, "--resume"], capsys
    )
    assert snapshot(run, ignore=LOCK) == before
    assert "train.accumulate" in line, line
    assert "data.batch_size=1 " in line or "data.batch_size=1;" in line, line
    assert "set data.batch_size=4" not in line, line


def test_pack_ema_records_the_ema_scores_in_its_provenance(runs, tmp_path, capsys) -> None:
    """BUG F2: ``pack --ema`` wrote the raw weights' val metrics and nothing saying the packed
    weights are the moving average."""
    ckpt = load_checkpoint(runs["ema"] / "last.pt")
    raw, ema = ckpt["metrics"]["mIoU"], ckpt["metrics"]["ema"]["mIoU"]
    assert raw != ema
    args = ["pack", str(runs["ema"] / "last.pt"), "tiny-ema", "--out", str(tmp_path), "--ema"]
    assert main(args) == 0
    provenance = json.loads((tmp_path / "tiny-ema.json").read_text())["provenance"]
    assert provenance["val_metrics"]["mIoU"] == pytest.approx(ema), provenance["val_metrics"]
    assert "ema" in json.dumps({k: v for k, v in provenance.items() if k != "recipe"}).lower()


def test_resume_without_train_ema_says_the_ema_is_dropped(runs, tmp_path, capsys) -> None:
    """BUG F3: resuming a run that kept an EMA without train.ema drops it from the run's
    checkpoints without a word (switching it on when resuming does get a warning)."""
    run = _copy_run(runs, "ema", tmp_path / "run")
    args = ["train", "unet_demo", *tiny_recipe(runs["data"], run), "train.max_steps=10"]
    assert main([*args, "--resume"]) == 0
    err = capsys.readouterr().err
    if "ema" not in load_checkpoint(run / "last.pt"):
        assert "train.ema" in err, err


@pytest.fixture
def launcher(monkeypatch) -> list[int]:
    """torchrun's launcher replaced by a recorder: the processes it would have started."""
    calls: list[int] = []

    def record(nproc: int, args) -> int:
        calls.append(nproc)
        return 0

    monkeypatch.setattr(distributed, "run_torchrun", record)
    monkeypatch.setattr(distributed, "torchrun_local_world_size", lambda: None)
    return calls


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_nproc_checks_the_ema_before_starting_processes(
    runs, tmp_path, capsys, launcher, command
) -> None:
    """BUG F4: ``--ema`` on a checkpoint without one was found by each of the N workers (N+1
    error lines, after starting them); it needs no worker."""
    args = _ema_commands(str(runs["plain"] / "last.pt"), runs, tmp_path)[command]
    line = run_cli([*args, "--ema", "--device", "cpu", "--nproc", "2"], capsys)
    assert "--ema" in line and launcher == []


def test_predict_nproc_checks_out_before_starting_processes(
    runs, tmp_path, capsys, launcher
) -> None:
    """BUG F5: predict --nproc started its workers before refusing an --out holding outputs
    (eval checks its --out first)."""
    images, out = str(runs["data"] / "images"), tmp_path / "pred"
    model = str(runs["plain"] / "last.pt")
    assert main(["predict", images, "--model", model, "--out", str(out), "--device", "cpu"]) == 0
    capsys.readouterr()
    before = snapshot(out)
    line = run_cli(["predict", images, "--model", model, "--out", str(out), "--nproc", "2"], capsys)
    assert str(out) in line and "--overwrite" in line
    assert launcher == [] and snapshot(out) == before


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "two"])
@pytest.mark.parametrize("command", ["train", "eval", "predict"])
def test_bad_nproc_is_one_line(runs, tmp_path, capsys, launcher, command, value) -> None:
    """Guard: --nproc takes a whole number >= 1; nothing is launched."""
    args = {
        "train": ["train", "unet_demo", *tiny_recipe(runs["data"], tmp_path / "run")],
        **_ema_commands(str(runs["plain"] / "last.pt"), runs, tmp_path),
    }[command]
    line = run_cli([*args, "--nproc", value], capsys)
    assert "--nproc" in line and launcher == []
