"""The one checkpoint writer and reader.

Checkpoints are written atomically (temporary file in the same folder, fsync, ``os.replace``), so
an interrupted save never corrupts ``last.pt``; the file gets the permissions the user's umask
gives other files (group-readable by default). They hold only
tensors, numbers, strings, lists and dicts, so they load with ``torch.load(weights_only=True)``:
no arbitrary objects are unpickled, and a checkpoint from a stranger cannot run code.

Reading verifies the CRC-32 of every record of the zip archive first (``torch.load`` does not:
a flipped byte in a tensor would load as a silently different weight), so a damaged file is
refused with one line naming it.
"""

from __future__ import annotations

import os
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from denseseg.checkpoint.files import TMP_SUFFIX, atomic_write
from denseseg.errors import CheckpointError, DataError

__all__ = [
    "FORMAT_VERSION",
    "atomic_save",
    "load_checkpoint",
    "remove_stale_temporaries",
    "rng_state",
    "set_rng_state",
    "unwrap_state_dict",
]

FORMAT_VERSION = 1


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically (:func:`~denseseg.checkpoint.files.atomic_write`,
    plus an fsync): the file is either the old one or the new one, never half of one.

    Raises:
        CheckpointError: the folder cannot be written (read-only, full disk, ...); ``path``
            is then left as it was.
    """
    path = Path(path)
    try:
        with atomic_write(path, "checkpoint") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
    except DataError as exc:
        kept = f"; the previous {path.name} is kept" if path.is_file() else ""
        raise CheckpointError(f"{exc}{kept}") from None


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files an :func:`atomic_save` killed mid-write left in ``folder``
    (``.NAME.RANDOM.tmp``). Call it only while holding the folder's run lock."""
    stale = [p for p in Path(folder).glob(f".*.pt.*{TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``), after checking its records' CRC-32.

    Raises:
        CheckpointError: the file is missing, truncated, damaged, holds objects other than
            tensors and plain values, or is not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; give the path of a .pt file")
    try:
        _verify_zip(path)
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # a damaged file can fail anywhere inside the unpickler
        raise CheckpointError(f"checkpoint {path} cannot be read ({_reason(exc)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} is not a denseseg checkpoint (it holds a {type(obj).__name__})"
        )
    return obj


def _verify_zip(path: Path) -> None:
    # torch.save writes a zip archive with CRC-32s that torch.load never checks; zipfile does.
    # (Files in torch's legacy, non-zip format are left to torch.load.)
    if not zipfile.is_zipfile(path):
        return
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        bad = archive.testzip()
    kind = _exported_kind(names)
    if kind is not None:
        raise CheckpointError(
            f"{path} is a {kind} file written by denseseg export (or PyTorch), not a checkpoint "
            "of denseseg train: run it with its runtime, or give the checkpoint or built-in "
            "name it was exported from (an .onnx export loads as --model directly)"
        )
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {path} is damaged (record {bad} fails its CRC-32 check); "
            "use an earlier checkpoint (step_*.pt) or train again"
        )


def _exported_kind(names: list[str]) -> str | None:
    """``"TorchScript"`` or ``"torch.export (pt2)"`` when a zip archive's record names are
    those formats' (``torch.jit.save`` writes ``code/`` and ``constants.pkl``;
    ``torch.export.save`` writes ``archive_format`` and serialized programs), else None."""
    if any(n.endswith("/archive_format") or "serialized_exported_program" in n for n in names):
        return "torch.export (pt2)"
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        return "TorchScript"
    return None


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    if "Weights only load failed" in text or "weights_only" in text:
        return (
            "it holds Python objects other than tensors and plain values, which are not "
            "loaded because unpickling them could run code"
        )
    first = text.splitlines()[0] if text else type(exc).__name__
    return f"damaged or not a checkpoint: {first[:160]}"


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states in a weights_only-loadable form."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": _to_lists(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(_to_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(obj: Any) -> Any:
    return [_to_lists(o) for o in obj] if isinstance(obj, tuple | list) else obj


def _to_tuples(obj: Any) -> Any:
    return tuple(_to_tuples(o) for o in obj) if isinstance(obj, list) else obj


def unwrap_state_dict(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights inside a denseseg checkpoint, or the dict itself if it is a state_dict."""
    if "model" in obj and isinstance(obj["model"], dict):
        return obj["model"]
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        return obj["state_dict"]
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise CheckpointError("the file holds neither a denseseg checkpoint nor a state_dict")
