"""PreciseBN: batch-norm running statistics recomputed over training batches before evaluation
(Wu & Johnson 2021): the averages equal the batches' statistics, the weights, momentum and mode
are left as they were, and the trainer's evaluation uses the recomputed statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import tiny_recipe
from denseseg.api import load_model
from denseseg.config import load_config
from denseseg.data.registry import get_dataset
from denseseg.engine.evaluate import evaluate
from denseseg.engine.precise_bn import calibration_batches, recompute_bn_stats
from denseseg.engine.sampler import SeededTransformDataset
from denseseg.engine.trainer import train


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4, momentum=0.01),
        nn.ReLU(),
        nn.Conv2d(4, 2, 1),
        nn.BatchNorm2d(2),
    )
    # Stale averages, as after the first steps of a run from scratch.
    net[1].running_var.fill_(1e4)
    net[1].running_mean.fill_(50.0)
    return net.eval()


def test_statistics_are_the_average_over_the_batches() -> None:
    net = _net()
    batches = [torch.randn(2, 3, 8, 9) * 3 + 1, torch.randn(3, 3, 8, 9) - 2]
    weights = [p.clone() for p in net.parameters()]
    assert recompute_bn_stats(net, batches) == 2
    feats = [net[0](b) for b in batches]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(net[1].running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net[1].running_var, var, rtol=1e-5, atol=1e-5)
    assert not net.training and net[1].momentum == 0.01 and net[4].momentum == 0.1
    assert all(torch.equal(a, b) for a, b in zip(weights, net.parameters()))


def test_one_batch_makes_eval_mode_agree_with_training_mode() -> None:
    net = _net()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        stale = net(x)
        net.train()
        batch_stats = net(x)
        net.eval()
    assert (stale - batch_stats).abs().max() > 0.1
    recompute_bn_stats(net, [x])
    with torch.no_grad():
        # Equal up to the unbiased (n / (n - 1)) variance kept in the running average.
        torch.testing.assert_close(net(x), batch_stats, rtol=1e-2, atol=1e-2)


def test_dropout_stays_off_and_no_random_numbers_are_drawn() -> None:
    torch.manual_seed(0)
    with_dropout = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5), nn.BatchNorm2d(4))
    without = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Identity(), nn.BatchNorm2d(4))
    without.load_state_dict(with_dropout.state_dict())
    with_dropout.train()
    with_dropout[0].eval()  # a mixed state, restored module by module
    x = torch.randn(2, 3, 9, 9)
    before = torch.random.get_rng_state()
    recompute_bn_stats(with_dropout, [x])
    assert torch.equal(torch.random.get_rng_state(), before)
    recompute_bn_stats(without, [x])
    torch.testing.assert_close(with_dropout[2].running_var, without[2].running_var)
    assert [m.training for m in with_dropout] == [False, True, True]


def test_a_model_without_batch_norm_is_left_alone() -> None:
    net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.GroupNorm(1, 2))
    assert recompute_bn_stats(net, iter(lambda: pytest.fail("no batch is drawn"), None)) == 0


def test_calibration_batches_are_seeded_and_leave_the_global_rng_alone() -> None:
    class Items(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 5

        def __getitem__(self, i: int):
            return torch.full((1, 2, 2), float(i)), torch.zeros(2, 2, dtype=torch.long)

    ds = SeededTransformDataset(Items(), lambda im, t: (im + torch.rand(()), t))
    before = torch.random.get_rng_state()
    a = list(calibration_batches(ds, 3, 2, seed=7))
    assert torch.equal(torch.random.get_rng_state(), before)
    b = list(calibration_batches(ds, 3, 2, seed=7))
    assert len(a) == 3 and all(x.shape == (2, 1, 2, 2) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # The first pass over the data uses each item once.
    firsts = sorted(int(x[i, 0, 0, 0]) for x in a[:2] for i in range(2))
    assert len(set(firsts)) == 4
    assert not torch.equal(torch.cat(a), torch.cat(list(calibration_batches(ds, 3, 2, seed=8))))


def test_images_of_different_sizes_come_one_by_one() -> None:
    class Sizes(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int):
            return torch.zeros(1, 4 + i, 5), torch.zeros(4 + i, 5, dtype=torch.long)

    ds = SeededTransformDataset(Sizes(), lambda im, t: (im, t))
    batches = list(calibration_batches(ds, 1, 3, seed=0))
    assert sorted(b.shape[2] for b in batches) == [4, 5, 6]
    assert all(b.shape[0] == 1 for b in batches)


def test_trainer_evaluates_with_recomputed_statistics(tiny_dataset: Path, tmp_path: Path) -> None:
    over = tiny_recipe(tiny_dataset, tmp_path / "run", **{"train.precise_bn": 2})
    result = train(load_config("unet_demo", over))
    # The logged metric is that of the saved weights and statistics, evaluated afresh.
    seg = load_model(tmp_path / "run" / "last.pt", device="cpu")
    fresh = evaluate(seg, get_dataset("folder", tiny_dataset, "val"), batch_size=2).compute()
    assert fresh["mIoU"] == pytest.approx(result["metrics"]["mIoU"], abs=1e-6)
    # Recomputed, not the running averages of training: momentum 0.1 over 8 steps leaves
    # 0.9**8 = 43 % of the initial running_var (ones) in place, recomputation none of it.
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    plain = tmp_path / "plain"
    train(load_config("unet_demo", tiny_recipe(tiny_dataset, plain)))
    other = torch.load(plain / "last.pt", weights_only=True)["model"]
    key = next(k for k in state if k.endswith("running_var"))
    assert not torch.allclose(state[key], other[key])


def test_without_validation_the_last_checkpoint_keeps_recomputed_statistics(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    """data.val_split null: no evaluation, yet last.pt holds the recomputed statistics."""
    over = {"data.val_split": "null", "train.precise_bn": 2}
    train(load_config("unet_demo", tiny_recipe(tiny_dataset, tmp_path / "none", **over)))
    with_val = tmp_path / "val"
    train(load_config("unet_demo", tiny_recipe(tiny_dataset, with_val, **{"train.precise_bn": 2})))
    state = torch.load(tmp_path / "none" / "last.pt", weights_only=True)["model"]
    other = torch.load(with_val / "last.pt", weights_only=True)["model"]
    # Same seed, same steps: the same weights and the same recomputation at the last step.
    for key in (k for k in state if k.endswith(("running_var", "running_mean"))):
        torch.testing.assert_close(state[key], other[key])
