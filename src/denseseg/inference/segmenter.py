"""``Segmenter``: the one inference entry point, used alike by predict, eval and serve.

It owns preprocessing (uint8 -> normalised float), batching of images of mixed sizes (padded to a
common size, each output cropped back to its own image), and turning logits into labels (argmax,
or a sigmoid threshold for binary models with one output channel).

Modes:

* ``"whole"``: the model sees the whole image at once. A valid-padding network (the original
  U-Net, whose output is the centre of its input) gets one tile: the image mirror-padded by the
  context the network loses, so its output covers every pixel.
* ``"overlap_tile"`` (U-Net paper, Fig. 2): valid-padding networks only. The image is cut into
  tiles of at most ``tile_size`` input pixels whose outputs tile the image; each tile's input is
  its output region plus the lost context, taken from the image or, at the border, its mirror
  image. Memory is bounded by the tile, so any image size can be segmented. Tiles start on the
  network's pooling grid (output steps are multiples of it, so neighbouring outputs may overlap a
  few pixels), which makes the result equal to the whole-image one, not just close to it.

Both modes go through the one tiler (:func:`plan_tiles` and :meth:`Segmenter._tiled_logits`);
whole-image inference of a valid network is its single-tile case.

Test-time augmentation (``tta``), on top of either mode: the image is segmented under several
flips and rotations, each output is mapped back, and the class probabilities are averaged.

* ``"none"``: one pass.
* ``"hflip"``: the image and its mirror image (2 passes), as DeepLab's and mmsegmentation's
  flip testing.
* ``"d4"``: the 8 symmetries of the square (rotations by 0/90/180/270 degrees, each also
  mirrored), as the U-Net paper's averaging over rotated versions of the input: for images with
  no preferred orientation (microscopy, EM), not for street scenes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from denseseg.data.palette import default_palette
from denseseg.errors import ConfigError, DataError
from denseseg.inference.runtimes import make_runtime

MODES = ("whole", "overlap_tile")
TTA = ("none", "hflip", "d4")
# Each transform is (quarter turns k, mirror): x -> rot90(flip(x) if mirror else x, k).
_TRANSFORMS = {
    "none": ((0, False),),
    "hflip": ((0, False), (0, True)),
    "d4": tuple((k, m) for m in (False, True) for k in range(4)),
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else the CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` and
    ``"mps"`` are accepted where this machine has them.

    Raises:
        ConfigError: an unknown device name, or one this machine does not have.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {str(device)!r} is unknown; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available; use cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} GPUs")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r} asked for, but MPS is not available; use cpu")
    return dev


class Segmenter:
    """Run a semantic segmentation model on images.

    Args:
        model: a model returning ``{"out": logits (N, K, H', W')}``.
        mean: per-channel normalisation mean in 0-1 units.
        std: per-channel normalisation std in 0-1 units.
        class_names: names of the K classes (two for a binary model with one output channel).
        palette: one RGB colour per class, for colouring label maps.
        ignore_index: label value that marks pixels to ignore in targets.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        threshold: probability above which a binary model (one channel) predicts class 1.
        amp: run CUDA inference in float16 autocast.
        meta: free-form information kept with the model (its name, kwargs, checkpoint path).
        mode: ``"whole"`` or ``"overlap_tile"`` (see the module docstring).
        tile_size: for ``"overlap_tile"``: the largest tile side the network is fed, an int or
            ``(height, width)``; rounded down to a size the network accepts (572 for the paper's
            U-Net gives 388x388 output tiles).
        fast: run frozen TorchScript traces (one per input shape, weights frozen at the first
            call; see :mod:`denseseg.inference.fast`): the fastest path on a CPU, for deployment.
        tta: test-time augmentation, ``"none"``, ``"hflip"`` or ``"d4"`` (see the module
            docstring); costs 1, 2 or 8 passes.
        backend: where the forward pass runs, ``"torch"``, ``"onnxruntime"`` or
            ``"openvino"`` (see :mod:`denseseg.inference.runtimes`).
        precision: ``"fp32"`` or ``"bf16"`` (bfloat16 autocast where the device supports it).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        class_names: Sequence[str] | None = None,
        palette: Sequence[Sequence[int]] | None = None,
        ignore_index: int = 255,
        device: str | torch.device = "auto",
        threshold: float = 0.5,
        amp: bool = False,
        meta: dict[str, Any] | None = None,
        mode: str = "whole",
        tile_size: int | Sequence[int] | None = None,
        fast: bool = False,
        tta: str = "none",
        backend: str = "torch",
        precision: str = "fp32",
    ) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.fast = bool(fast)
        self.backend = backend
        self.precision = precision
        out_channels = int(getattr(model, "num_classes", 0) or 0)
        self.binary = out_channels == 1
        n = 2 if self.binary else out_channels
        self.class_names = list(class_names) if class_names else [f"class_{i}" for i in range(n)]
        self.num_classes = len(self.class_names)
        if palette is None:
            palette = default_palette(self.num_classes)
        self.palette = [tuple(int(c) for c in p) for p in palette]
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
        self.in_channels = int(getattr(model, "in_channels", len(self.mean)))
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ConfigError(
                f"normalisation has {len(self.mean)} channels but the model takes "
                f"{self.in_channels}; set data.mean/data.std to {self.in_channels} values"
            )
        self.ignore_index = ignore_index
        self.threshold = threshold
        self.amp = amp and self.device.type == "cuda"
        self.meta = dict(meta or {})
        self.valid = getattr(model, "padding", "same") == "valid"
        self.mode = mode
        self.tile_size = _check_mode(model, mode, tile_size, self.valid)
        if tta not in TTA:
            raise ConfigError(
                f"unknown test-time augmentation tta={tta!r}; choose {', '.join(TTA)}"
            )
        self.tta = tta
        self.runtime = make_runtime(
            self.model,
            self.device,
            backend=backend,
            fast=self.fast,
            amp=self.amp,
            precision=precision,
        )

    # ---------------------------------------------------------------- preprocessing
    def preprocess(self, image: Tensor) -> Tensor:
        """uint8 ``(C, H, W)`` -> normalised float32 ``(C, H, W)`` on the CPU."""
        if image.ndim != 3:
            raise DataError(f"expected an image tensor (C, H, W), got shape {tuple(image.shape)}")
        image = self._match_channels(image)
        x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        return (x - self.mean) / self.std

    def _match_channels(self, image: Tensor) -> Tensor:
        c = image.shape[0]
        if c == self.in_channels:
            return image
        if c == 1 and self.in_channels == 3:
            return image.expand(3, -1, -1)
        if c == 3 and self.in_channels == 1:
            # ITU-R 601 luma, as PIL's convert("L").
            w = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
            return (image.float() * w).sum(0, keepdim=True).round().to(image.dtype)
        raise DataError(f"image has {c} channels; the model takes {self.in_channels}")

    # ---------------------------------------------------------------- model call
    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        """Logits for a normalised batch ``(N, C, H, W)`` -> ``(N, K, H, W)`` (K = 1 for binary).

        Valid-padding models are run through the tiler (one tile in ``"whole"`` mode) so the
        output covers every pixel. With test-time augmentation the returned logits are the log
        of the averaged probabilities (logit of the averaged sigmoid for a binary model), so
        that softmax, sigmoid and arg-max of them are those of the average.
        """
        x = x.to(self.device)
        # Always infer in eval mode (batch norm running statistics, no dropout), even when the
        # trainer hands us a model it has put back into training mode; restore the mode after.
        was_training = self.model.training
        self.model.eval()
        try:
            if self.tta == "none":
                return self._single_logits(x)
            return self._tta_logits(x, _TRANSFORMS[self.tta])
        finally:
            self.model.train(was_training)

    def _single_logits(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        out = self._tiled_logits(x, self.tile_size) if self.valid else self._forward(x)
        out = out.float()[..., :h, :w]
        if out.shape[-2:] != (h, w):
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        return out

    def _tta_logits(self, x: Tensor, transforms: Sequence[tuple[int, bool]]) -> Tensor:
        total: Tensor | None = None
        for k, mirror in transforms:
            y = x.flip(-1) if mirror else x
            out = self._single_logits(torch.rot90(y, k, (-2, -1)))
            out = torch.rot90(out, -k, (-2, -1))
            p = torch.sigmoid(out) if self.binary else out.softmax(1)
            p = p.flip(-1) if mirror else p
            total = p if total is None else total + p
        assert total is not None
        p = (total / len(transforms)).clamp_min(1e-12)
        if self.binary:
            return torch.log(p) - torch.log1p(-p.clamp_max(1 - 1e-7))
        return torch.log(p)

    def _forward(self, x: Tensor) -> Tensor:
        return self.runtime(x)

    def _tiled_logits(self, x: Tensor, tile_size: tuple[int, int] | None) -> Tensor:
        """Run a valid-padding model tile by tile over a mirror-padded ``x (N, C, H, W)``.

        Returns:
            Logits ``(N, K, H', W')`` with ``H' >= H``, ``W' >= W``, aligned with ``x`` at the
            top-left corner.
        """
        h, w = x.shape[-2:]
        rows = plan_tiles(h, self.model, None if tile_size is None else tile_size[0])
        cols = plan_tiles(w, self.model, None if tile_size is None else tile_size[1])
        # Mirror the border so that every tile's input, context included, lies in the padded
        # image: the output of the first tile starts at the image's first pixel.
        x = _reflect_pad(
            x,
            cols.border,
            cols.padded_size - w - cols.border,
            rows.border,
            rows.padded_size - h - rows.border,
        )
        out: Tensor | None = None
        for top in rows.starts:
            for left in cols.starts:
                y = self._forward(x[..., top : top + rows.tile_in, left : left + cols.tile_in])
                if out is None:
                    out = y.new_empty((*y.shape[:2], rows.covered, cols.covered))
                # Overlapping outputs are equal (same context, same pooling grid): overwrite.
                out[..., top : top + rows.tile_out, left : left + cols.tile_out] = y
        assert out is not None
        return out

    # ---------------------------------------------------------------- prediction
    @torch.no_grad()
    def predict_batch(
        self, images: Sequence[Tensor], return_probs: bool = False
    ) -> tuple[list[Tensor], list[Tensor] | None]:
        """Segment images of possibly different sizes in one forward pass.

        Args:
            images: uint8 tensors ``(C, H_i, W_i)``.
            return_probs: also return class probabilities ``(K, H_i, W_i)`` per image.

        Returns:
            (labels, probs): int64 label maps ``(H_i, W_i)``, and probabilities or None.
        """
        xs = [self.preprocess(im) for im in images]
        batch, sizes = pad_batch(xs, value=0.0)
        logits = self.logits(batch)
        if self.binary:
            probs = torch.sigmoid(logits)
            labels_b = (probs[:, 0] > self.threshold).long()
        else:
            # The arg-max of the logits is the arg-max of the softmax; max().indices (first
            # maximum on ties, as argmax) is several times faster than argmax over channels on
            # a CPU. Probabilities are computed only when asked for.
            labels_b = logits.max(1).indices
            probs = logits.softmax(1) if return_probs else logits
        labels, outs = [], []
        for i, (h, w) in enumerate(sizes):
            labels.append(labels_b[i, :h, :w].cpu())
            if return_probs:
                p = probs[i, :, :h, :w]
                if self.binary:
                    p = torch.cat([1 - p, p], 0)
                outs.append(p.cpu())
        return labels, (outs if return_probs else None)

    def predict(self, image: Tensor) -> Tensor:
        """Segment one uint8 image ``(C, H, W)`` -> int64 label map ``(H, W)``."""
        return self.predict_batch([image])[0][0]

    def predict_proba(self, image: Tensor) -> Tensor:
        """Class probabilities ``(K, H, W)`` for one uint8 image ``(C, H, W)``."""
        probs = self.predict_batch([image], return_probs=True)[1]
        assert probs is not None
        return probs[0]

    def __repr__(self) -> str:
        name = self.meta.get("model_name", type(self.model).__name__)
        mode = self.mode if self.tile_size is None else f"{self.mode} {self.tile_size}"
        tta = "" if self.tta == "none" else f", tta={self.tta}"
        return f"Segmenter({name}, classes={self.num_classes}, device={self.device}, {mode}{tta})"


# -------------------------------------------------------------------- the tiler


@dataclass(frozen=True)
class TilePlan:
    """How one image axis is cut into tiles for a valid-padding network.

    Attributes:
        tile_in: input side of every tile.
        tile_out: output side of every tile.
        border: context the network loses on the leading side, ``(tile_in - tile_out) // 2``.
        starts: start of each tile, in padded-image coordinates (= its output's start in the
            image).
    """

    tile_in: int
    tile_out: int
    border: int
    starts: tuple[int, ...]

    @property
    def covered(self) -> int:
        """Output pixels covered by the tiles (at least the image side)."""
        return self.starts[-1] + self.tile_out

    @property
    def padded_size(self) -> int:
        """Side of the mirror-padded image the tiles are cut from."""
        return self.starts[-1] + self.tile_in


def plan_tiles(size: int, model: Any, max_tile: int | None = None) -> TilePlan:
    """Tiles covering an image side of ``size`` pixels for a valid-padding ``model``.

    The model must have ``valid_input_size(min_size)`` (smallest accepted input side) and
    ``output_size(input_size)`` (as :class:`denseseg.models.UNet`).

    With ``max_tile=None``, or when one tile of at most ``max_tile`` covers the image, the plan is
    one tile: the smallest accepted input whose output covers ``size``. Otherwise every tile has
    the largest accepted side ``<= max_tile``; tiles step by the largest multiple of the network's
    pooling grid (the spacing of accepted sizes, ``2**depth`` for a U-Net) not above the output
    tile, so every tile sees the image on the same pooling grid as the first one.

    Args:
        size: image side in pixels (>= 1).
        model: the valid-padding network.
        max_tile: the largest tile input side, or ``None`` for one tile.

    Returns:
        The plan for this axis.

    Raises:
        ConfigError: ``max_tile`` is too small for the network.
    """
    # A valid network's output is smaller than its input: start the search at ``size``.
    single = model.valid_input_size(size)
    while model.output_size(single) < size:
        single = model.valid_input_size(single + 1)
    if max_tile is None or single <= max_tile:
        out = model.output_size(single)
        return TilePlan(single, out, (single - out) // 2, (0,))
    tile_in = max_tile
    while tile_in >= 1 and model.valid_input_size(tile_in) != tile_in:
        tile_in -= 1
    smallest = model.valid_input_size(1)
    grid = model.valid_input_size(smallest + 1) - smallest
    tile_out = model.output_size(tile_in) if tile_in >= smallest else 0
    step = tile_out - tile_out % grid
    if step <= 0:
        least = smallest
        while model.output_size(least) < grid:
            least = model.valid_input_size(least + 1)
        raise ConfigError(
            f"tile_size {max_tile} is too small for this network (its output must reach "
            f"{grid} pixels); use tile_size >= {least}"
        )
    count = 1 + math.ceil(max(size - tile_out, 0) / step)
    return TilePlan(
        tile_in, tile_out, (tile_in - tile_out) // 2, tuple(range(0, count * step, step))
    )


def _check_mode(
    model: nn.Module, mode: str, tile_size: int | Sequence[int] | None, valid: bool
) -> tuple[int, int] | None:
    """Validate ``mode`` / ``tile_size``; returns the tile size as ``(h, w)`` or None."""
    if mode not in MODES:
        raise ConfigError(f"unknown inference mode {mode!r}; choose {' or '.join(MODES)}")
    if mode == "whole":
        return None
    if not valid:
        raise ConfigError(
            "mode='overlap_tile' needs a valid-padding network (e.g. unet_valid); this model "
            "pads its convolutions, use mode='whole'"
        )
    if tile_size is None:
        raise ConfigError("mode='overlap_tile' needs tile_size (e.g. 572 for the paper's U-Net)")
    sides = (tile_size, tile_size) if isinstance(tile_size, int) else tuple(tile_size)
    if len(sides) != 2 or not all(isinstance(t, int) and t >= 1 for t in sides):
        raise ConfigError(f"tile_size={tile_size!r} must be an integer or (height, width) >= 1")
    for side in sides:  # fail now, not on the first large image
        plan_tiles(side + 1, model, side)
    return sides[0], sides[1]


def pad_batch(xs: Sequence[Tensor], value: float = 0.0) -> tuple[Tensor, list[tuple[int, int]]]:
    """Stack ``(C, H_i, W_i)`` tensors into ``(N, C, H, W)``, padding bottom/right with ``value``.

    Returns:
        The batch and the original ``(H_i, W_i)`` of each item.
    """
    sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in xs]
    h = max(s[0] for s in sizes)
    w = max(s[1] for s in sizes)
    out = xs[0].new_full((len(xs), *xs[0].shape[:-2], h, w), value)
    for i, x in enumerate(xs):
        out[i, ..., : x.shape[-2], : x.shape[-1]] = x
    return out, sizes


def _reflect_pad(x: Tensor, left: int, right: int, top: int, bottom: int) -> Tensor:
    # F.pad's reflect mode needs pad < size; repeat in steps for small images.
    while left or right or top or bottom:
        h, w = x.shape[-2:]
        step = (min(left, w - 1), min(right, w - 1), min(top, h - 1), min(bottom, h - 1))
        if step == (0, 0, 0, 0):
            return F.pad(x, (left, right, top, bottom), mode="replicate")
        x = F.pad(x, step, mode="reflect")
        left, right, top, bottom = (a - b for a, b in zip((left, right, top, bottom), step))
    return x
