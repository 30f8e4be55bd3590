"""The options that make a training step faster or its result better: mixed precision
(``train.precision``), channels-last memory order, ``torch.compile``, gradient accumulation
(``train.accumulate``) and a moving average of the weights (``train.ema``).

Each option must compute what the plain run computes (accumulating 2 batches of B is one batch
of 2B; channels-last and compile reorder the same arithmetic), or say what it changes (bfloat16
runs the convolutions in bfloat16, the weights stay float32), and keep exact resume.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import denseseg
from conftest import tiny_recipe, write_folder_dataset
from denseseg.checkpoint import load_checkpoint
from denseseg.config import load_config
from denseseg.engine.hooks import HookBase, summary
from denseseg.engine.precision import resolve_precision
from denseseg.engine.trainer import Trainer, train
from denseseg.errors import CheckpointError, ConfigError

# No batch norm (its batch statistics differ between a batch of 4 and two of 2), no ignored
# pixels (whole-image crops), no class weights: accumulation then equals the bigger batch.
PLAIN = [
    "model.kwargs={base_channels: 4, depth: 2, batch_norm: false}",
    "data.scale_range=null",
    "data.crop_size=[24, 24]",
    "train.deterministic=true",
    "train.log_every=1",
    "train.keep_last=0",
]
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("nondeterministic_afterwards")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_folder_dataset(tmp_path_factory.mktemp("options") / "data", n_train=8)


def _cfg(data: Path, out: Path, *extra: str):
    return load_config("unet_demo", tiny_recipe(data, out) + PLAIN + list(extra))


def _weights(run: Path, key: str = "model") -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(run / "last.pt")
    return ckpt[key] if key == "model" else ckpt[key]["model"]


def _close(a: dict, b: dict, atol: float = 1e-5) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol) for k in a)


def _csv(run: Path, column: str) -> list[float]:
    with (run / "log.csv").open() as fh:
        return [float(r[column]) for r in csv.DictReader(fh) if r[column]]


# ---------------------------------------------------------------- precision
@pytest.mark.parametrize(
    "name, amp, expected",
    [
        ("auto", True, None),
        ("fp32", True, None),
        ("bf16", True, torch.bfloat16),
        ("auto", False, None),
    ],
    ids=["auto-is-fp32", "fp32", "bf16", "old-amp-false"],
)
def test_precision_on_a_cpu(name: str, amp: bool, expected) -> None:
    p = resolve_precision(name, CPU, amp)
    assert p.dtype is expected and not p.scaled


@pytest.mark.parametrize(
    "name, bf16_gpu, expected",
    [
        ("auto", True, torch.bfloat16),
        ("auto", False, torch.float16),
        ("fp16", True, torch.float16),
        ("bf16", True, torch.bfloat16),
    ],
    ids=["auto-recent-gpu", "auto-older-gpu", "fp16", "bf16"],
)
def test_precision_on_cuda(monkeypatch, name: str, bf16_gpu: bool, expected) -> None:
    """``auto``: bfloat16 where the GPU has it, otherwise float16 with a gradient scaler."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16_gpu)
    p = resolve_precision(name, torch.device("cuda", 0))
    assert p.dtype is expected and p.scaled == (expected is torch.float16)


def test_precision_a_device_cannot_run_is_refused(monkeypatch) -> None:
    with pytest.raises(ConfigError, match="train.precision=fp16 needs a CUDA device"):
        resolve_precision("fp16", CPU)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    with pytest.raises(ConfigError, match="no bfloat16 support"):
        resolve_precision("bf16", torch.device("cuda", 0))


def test_bf16_on_a_cpu_without_bfloat16_instructions_warns(monkeypatch, caplog) -> None:
    import denseseg.engine.precision as precision

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="denseseg"):
        assert resolve_precision("bf16", CPU).dtype is torch.bfloat16
    assert "no bfloat16 instructions" in caplog.text
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    caplog.clear()
    resolve_precision("bf16", CPU)
    assert "no bfloat16" not in caplog.text


def test_bf16_runs_convolutions_in_bfloat16_and_keeps_float32_weights(data, tmp_path) -> None:
    trainer = Trainer(_cfg(data, tmp_path, "train.precision=bf16"), tmp_path)
    assert trainer.model.training  # run_step straight away trains, as in the loop
    seen: list[torch.dtype] = []
    conv = next(m for m in trainer.model.modules() if isinstance(m, nn.Conv2d))
    conv.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    batch = next(iter(trainer._loader()))
    trainer.run_step(batch)
    assert seen == [torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert trainer.loss == trainer.loss and trainer.step == 1
    assert "bfloat16 autocast" in summary(trainer)


# ---------------------------------------------------------------- accumulation
def test_accumulating_two_batches_is_one_batch_of_twice_the_size(data, tmp_path) -> None:
    """Same samples in the same order (the sampler keeps whole steps), same gradient, same
    logged loss; the checkpoint records the global batch of 4 for resumes."""
    train(_cfg(data, tmp_path / "big", "data.batch_size=4"))
    train(_cfg(data, tmp_path / "acc", "data.batch_size=2", "train.accumulate=2"))
    assert _close(_weights(tmp_path / "big"), _weights(tmp_path / "acc"))
    assert _csv(tmp_path / "big", "loss") == pytest.approx(_csv(tmp_path / "acc", "loss"), 1e-5)
    assert load_checkpoint(tmp_path / "acc" / "last.pt")["global_batch"] == 4


def test_accumulation_leaves_out_an_incomplete_last_step(data, tmp_path) -> None:
    """8 samples, batch 3 x 2 accumulated: one step per epoch, 6 samples, never a half step."""
    trainer = Trainer(_cfg(data, tmp_path, "data.batch_size=3", "train.accumulate=2"), tmp_path)
    groups = list(trainer._groups())
    assert [len(g) for g in groups] == [2]
    assert all(g[0].shape[0] == 3 for g in groups[0])
    assert "batch 3 x 1 process(es) x 2 accumulated = 6, 1 steps per epoch" in summary(trainer)


def test_accumulation_larger_than_the_split_is_refused(data, tmp_path) -> None:
    with pytest.raises(ConfigError, match="fewer than 1 process.*train.accumulate=16"):
        Trainer(_cfg(data, tmp_path, "train.accumulate=16"), tmp_path)


# ---------------------------------------------------------------- memory order, compile
def test_channels_last_trains_the_same_weights(data, tmp_path) -> None:
    trainer = Trainer(_cfg(data, tmp_path / "t", "train.channels_last=true"), tmp_path / "t")
    conv = next(m for m in trainer.model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    train(_cfg(data, tmp_path / "plain"))
    train(_cfg(data, tmp_path / "nhwc", "train.channels_last=true"))
    assert _close(_weights(tmp_path / "plain"), _weights(tmp_path / "nhwc"), atol=1e-4)


@pytest.mark.slow
@pytest.mark.heavy  # make test-all: keeps make test under 15 minutes
def test_compiled_model_trains_the_same_weights(data, tmp_path) -> None:
    """torch.compile (inductor, a C++ compiler on the CPU) fuses the same arithmetic."""
    steps = ["train.max_steps=3", "train.eval_every=0", "train.ckpt_every=0"]
    train(_cfg(data, tmp_path / "eager", *steps))
    train(_cfg(data, tmp_path / "compiled", *steps, "train.compile=true"))
    assert _close(_weights(tmp_path / "eager"), _weights(tmp_path / "compiled"), atol=1e-4)


# ---------------------------------------------------------------- EMA
class _Record(HookBase):
    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def after_step(self, trainer) -> None:
        self.states.append({k: v.clone() for k, v in trainer.model.state_dict().items()})


def test_ema_is_the_moving_average_of_the_weights(data, tmp_path) -> None:
    decay, record = 0.8, _Record()
    train(_cfg(data, tmp_path, f"train.ema={decay}"), hooks=[record])
    expected = dict(record.states[0])  # the first update copies the weights
    for state in record.states[1:]:
        for k, v in state.items():
            if v.is_floating_point():
                expected[k] = decay * expected[k] + (1 - decay) * v
    ema = _weights(tmp_path, "ema")
    assert _close(
        {k: v for k, v in ema.items() if v.is_floating_point()},
        {k: v for k, v in expected.items() if v.is_floating_point()},
        atol=1e-6,
    )
    assert load_checkpoint(tmp_path / "last.pt")["ema"]["updates"] == len(record.states)
    # Evaluated beside the raw weights at each evaluation (steps 4 and 8), and loadable.
    assert len(_csv(tmp_path, "val_ema_mIoU")) == len(_csv(tmp_path, "val_mIoU")) == 2
    predictor = denseseg.load_model(tmp_path / "last.pt", device="cpu", ema=True)
    assert _close(predictor.model.state_dict(), ema)


def test_ema_of_a_checkpoint_without_one_is_one_clear_error(data, tmp_path) -> None:
    train(_cfg(data, tmp_path, "train.max_steps=2", "train.eval_every=0"))
    with pytest.raises(CheckpointError, match="last.pt: it holds no moving average"):
        denseseg.load_model(tmp_path / "last.pt", device="cpu", ema=True)


def test_resume_with_accumulation_and_ema_is_exact(data, tmp_path) -> None:
    """A run resumed from its step-4 checkpoint ends with the uninterrupted run's weights,
    EMA and optimiser, bit for bit."""
    opts = ["train.accumulate=2", "train.ema=0.5", "train.keep_last=2", "data.batch_size=2"]
    train(_cfg(data, tmp_path / "whole", *opts))
    step4 = tmp_path / "whole" / "step_0000004.pt"
    train(_cfg(data, tmp_path / "resumed", *opts), resume=step4)
    a, b = (load_checkpoint(tmp_path / r / "last.pt") for r in ("whole", "resumed"))
    assert a["step"] == b["step"] == 8
    for key in ("model",):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert all(torch.equal(a["ema"]["model"][k], b["ema"]["model"][k]) for k in a["model"])


def test_switching_ema_on_when_resuming_starts_it_from_the_resumed_weights(
    data, tmp_path, caplog
) -> None:
    train(_cfg(data, tmp_path, "train.keep_last=2"))
    with caplog.at_level(logging.WARNING, logger="denseseg"):
        out = tmp_path / "more"
        train(_cfg(data, out, "train.ema=0.9"), resume=tmp_path / "step_0000004.pt")
    assert "holds no EMA of the weights" in caplog.text
    assert load_checkpoint(out / "last.pt")["ema"]["updates"] == 4


def test_eval_predict_and_pack_take_the_ema_with_dash_dash_ema(
    data, tmp_path, capsys, monkeypatch
) -> None:
    """``eval --ema`` scores what training logged for the EMA at its last evaluation;
    ``predict --ema`` and ``pack --ema`` use those weights; without an EMA, one line."""
    import json

    from denseseg.cli import main

    run = tmp_path / "run"
    train(_cfg(data, run, "train.ema=0.8"))
    out = tmp_path / "eval"
    args = ["eval", "--model", str(run / "last.pt"), "--root", str(data), "--out", str(out)]
    assert main([*args, "--ema", "--device", "cpu"]) == 0
    miou = json.loads((out / "metrics.json").read_text())["mIoU"]
    assert miou == pytest.approx(_csv(run, "val_ema_mIoU")[-1], abs=1e-6)
    pred = tmp_path / "pred"
    predict = ["predict", str(data / "images"), "--model", str(run / "last.pt"), "--out"]
    assert main([*predict, str(pred), "--ema", "--device", "cpu"]) == 0
    assert any(pred.glob("*.png"))
    pack = ["pack", str(run / "last.pt"), "tiny_ema", "--out", str(tmp_path / "packed"), "--ema"]
    assert main([*pack, "--fp32"]) == 0
    monkeypatch.setenv("DENSESEG_PRETRAINED_DIR", str(tmp_path / "packed"))
    packed = denseseg.load_model("tiny_ema", device="cpu")
    assert _close(packed.model.state_dict(), _weights(run, "ema"))
    plain = tmp_path / "plain"
    train(_cfg(data, plain, "train.max_steps=2", "train.eval_every=0"))
    capsys.readouterr()
    args = ["eval", "--model", str(plain / "last.pt"), "--root", str(data), "--ema"]
    assert main([*args, "--out", str(tmp_path / "e2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no moving average" in err[0] and "--ema" in err[0]
