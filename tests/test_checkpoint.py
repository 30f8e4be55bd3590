from pathlib import Path

import pytest
import torch

from denseseg.checkpoint.serialization import (
    atomic_save,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from denseseg.errors import CheckpointError


def test_atomic_save_keeps_old_file_on_failure(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    atomic_save({"step": 1}, path)

    def boom(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(
        CheckpointError, match=r"cannot write checkpoint .*last.pt \(disk full\).*kept"
    ):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind


def test_truncated_and_missing_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    atomic_save({"model": {"w": torch.ones(100)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_rng_state_round_trip_is_weights_only_loadable(tmp_path: Path) -> None:
    import random

    import numpy as np

    atomic_save({"rng": rng_state()}, tmp_path / "r.pt")
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
