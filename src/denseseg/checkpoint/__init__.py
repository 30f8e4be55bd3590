"""Checkpoints and weight files: the bottom of the package.

Everything else may import this package; it imports only the standard library, numpy, torch,
safetensors and :mod:`denseseg.errors` (and torchvision, in :mod:`.torchvision_weights` alone,
for the table of its weights names), so models and backbones load weights without a cycle.

- :mod:`.files`: :func:`atomic_write` (the one writer of every output file) and
  :func:`show_path` (file names that always print).
- :mod:`.serialization`: :func:`atomic_save`, :func:`load_checkpoint` (CRC-checked,
  ``weights_only``), :func:`unwrap_state_dict`; for the trainer also ``rng_state``,
  ``set_rng_state`` and ``remove_stale_temporaries``, imported from there.
- :mod:`.weights`: :func:`read_state_dict` (any weights file), :func:`read_weights` (a file, a
  state_dict or a torchvision name), :func:`load_model_weights`, :func:`load_backbone_weights`.
- :mod:`.torchvision_weights`: :func:`fetch_torchvision_state_dict` (torchvision names).
"""

from denseseg.checkpoint.files import atomic_write, show_path
from denseseg.checkpoint.serialization import (
    FORMAT_VERSION,
    atomic_save,
    load_checkpoint,
    unwrap_state_dict,
)
from denseseg.checkpoint.torchvision_weights import fetch_torchvision_state_dict
from denseseg.checkpoint.weights import (
    LoadReport,
    WeightsSource,
    load_backbone_weights,
    load_model_weights,
    read_state_dict,
    read_weights,
)

__all__ = [
    "FORMAT_VERSION",
    "LoadReport",
    "WeightsSource",
    "atomic_save",
    "atomic_write",
    "fetch_torchvision_state_dict",
    "load_backbone_weights",
    "load_checkpoint",
    "load_model_weights",
    "read_state_dict",
    "read_weights",
    "show_path",
    "unwrap_state_dict",
]
