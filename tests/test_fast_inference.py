"""The Segmenter's fast path (frozen TorchScript traces) gives the eager model's predictions."""

from __future__ import annotations

import pytest
import torch

from denseseg import Segmenter, create_model
from denseseg.models import get_model_entry


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "unet", "deeplabv3plus"])
def test_fast_path_matches_eager(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, **get_model_entry(name).test_cfg)
    with torch.no_grad():  # non-trivial batch-norm statistics, to check their folding
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    norm = {"mean": [0.4] * 3, "std": [0.2] * 3, "device": "cpu"}
    eager, fast = Segmenter(model, **norm), Segmenter(model, fast=True, **norm)
    for size in [(45, 61), (64, 48), (45, 61)]:
        image = torch.randint(0, 256, (3, *size), dtype=torch.uint8)
        a, b = eager.predict_proba(image), fast.predict_proba(image)
        assert a.shape == b.shape == (4, *size)
        assert torch.allclose(a, b, atol=1e-4)
    assert len(fast.runtime) == 2  # one trace per input shape
