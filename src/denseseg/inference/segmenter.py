"""``Segmenter``: the one inference entry point, used alike by predict, eval and serve.

It owns preprocessing (uint8 -> normalised float), batching of images of mixed sizes (padded to a
common size, each output cropped back to its own image), and turning logits into labels (argmax,
or a sigmoid threshold for binary models with one output channel).

Modes:

* ``"whole"``: the model sees the whole image at once. A valid-padding network (the original
  U-Net, whose output is the centre of its input) gets one tile: the image mirror-padded by the
  context the network loses, so its output covers every pixel.
* ``"slide"`` (mmsegmentation's ``test_cfg=dict(mode="slide")``): windows of ``crop_size`` every
  ``stride`` pixels, the last one aligned to the image's end, a few windows per forward pass
  (``window_batch``); each pixel's logits are the mean over the windows covering it, uniform or
  weighted toward window centres (``weighting="gaussian"``, nnU-Net's map). For models trained
  on crops much smaller than the images they see (Cityscapes). An image no larger than the crop
  is one window, the whole-image result (:mod:`denseseg.inference.slide`). Same-padding models
  only: a valid-padding network has ``"overlap_tile"``, which is exact.
* ``"overlap_tile"`` (U-Net paper, Fig. 2): valid-padding networks only. The image is cut into
  tiles of at most ``tile_size`` input pixels whose outputs tile the image; each tile's input is
  its output region plus the lost context, taken from the image or, at the border, its mirror
  image. Tiles start on the network's pooling grid (output steps are multiples of it, so
  neighbouring outputs may overlap a few pixels), which makes the result equal to the
  whole-image one, not just close to it.

Whole-image inference of a valid network and overlap tiles go through the one tiler
(:func:`plan_tiles` and :meth:`Segmenter._tiled_logits`); whole-image inference is its
single-tile case.

Huge images (a 20000 x 20000 slide): :meth:`Segmenter.predict_large` runs ``"slide"`` or
``"overlap_tile"`` strip by strip, so that only one strip of logits is alive and the result is
written as uint8 labels as it goes; it gives :meth:`Segmenter.predict`'s labels.

Test-time augmentation (``tta``), on top of any mode: the image is segmented under several
flips, rotations or scales, each output is mapped back to the image, and the class
probabilities are averaged (mmsegmentation's ``SegTTAModel``).

* ``"none"``: one pass.
* ``"hflip"``: the image and its mirror image (2 passes), as DeepLab's and mmsegmentation's
  flip testing.
* ``"d4"``: the 8 symmetries of the square (rotations by 0/90/180/270 degrees, each also
  mirrored), as the U-Net paper's averaging over rotated versions of the input: for images with
  no preferred orientation (microscopy, EM), not for street scenes.
* ``"ms"``: multi-scale and flip, as DeepLab's and mmsegmentation's ``--tta``: the image resized
  (bilinear) by each of ``scales`` (default :data:`MS_SCALES`, 0.5 to 1.75), each also mirrored
  (12 passes at 0.5-1.75x the pixels); each pass runs in the Segmenter's mode (with
  ``"slide"``, every scaled image slides with the same window) and its logits are resized back
  to the image before the softmax.

Inputs (:func:`as_image`): a uint8 tensor ``(C, H, W)``, a uint8 numpy array ``(H, W, C)`` or
``(H, W)``, a PIL image, or an image file's path; floating point tensors and arrays in 0-1.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from denseseg.choices import MODES, TTA
from denseseg.data.io import read_image
from denseseg.data.palette import default_palette
from denseseg.errors import ConfigError, DataError
from denseseg.inference.runtimes import make_runtime
from denseseg.inference.slide import (
    WEIGHTINGS,
    ImageRows,
    check_window,
    slide_strips,
    tile_rows,
)

MS_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
"""Scales of ``tta="ms"`` by default: DeepLab's and mmsegmentation's (0.5 to 1.75)."""
# Each transform is (scale, quarter turns k, mirror): x -> rot90(flip(resize(x)), k).
_TRANSFORMS = {
    "none": ((1.0, 0, False),),
    "hflip": ((1.0, 0, False), (1.0, 0, True)),
    "d4": tuple((1.0, k, m) for m in (False, True) for k in range(4)),
}
# What predict_large streams: rows stay rows under these (no rotation, no resizing).
_STREAMED_TTA = ("none", "hflip")

ImageLike = Any
"""What :func:`as_image` takes: tensor, numpy array, PIL image or path."""


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


def as_image(image: ImageLike) -> Tensor:
    """What users hold, as the image tensor ``(C, H, W)`` the Segmenter segments.

    Accepted:

    * a ``torch.Tensor`` ``(C, H, W)`` or ``(H, W)`` (gray): uint8 0-255, or floating point in
      0-1 (as torchvision's ``to_tensor`` gives); returned as it is (a view for ``(H, W)``);
    * a numpy array ``(H, W, C)`` (C = 1, 3, or 4 with alpha, which is dropped) or ``(H, W)``:
      uint8, or floating point in 0-1; returned as a view, not copied (a huge image stays one
      copy);
    * a PIL image: modes ``1``/``L``/``LA`` as gray, ``RGB``, and ``P``/``RGBA``/``CMYK``/... as
      RGB (alpha dropped); its pixels are taken as they are (no EXIF rotation);
    * a path (``str`` or ``os.PathLike``): read by :func:`denseseg.data.io.read_image` (pixel
      limit, EXIF orientation, 16-bit and palette files).

    Raises:
        DataError: anything else, in one line: other types, integer types other than uint8
            (scale 16-bit images to 8 bits), float values outside 0-1 (0-255 floats: convert to
            uint8), a PIL image of 16-bit or float mode, or a shape that is no image.
    """
    if isinstance(image, str | os.PathLike):
        return read_image(image)
    if isinstance(image, Image.Image):
        return _from_pil(image)
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[2] in (2, 4):  # gray + alpha, RGB + alpha
            image = image[..., : image.shape[2] - 1]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)):
            raise DataError(
                f"a numpy image must be (H, W, C) with C 1, 3 or 4, or (H, W); got shape "
                f"{image.shape} (a (C, H, W) array: pass torch.from_numpy(array))"
            )
        with warnings.catch_warnings():  # read-only arrays (PIL's): we never write into them
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(image)
        tensor = tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor
        return _checked_tensor(tensor, "numpy array")
    if isinstance(image, Tensor):
        return _checked_tensor(image, "tensor")
    raise DataError(
        f"cannot segment a {type(image).__name__}; give a uint8 tensor (C, H, W), a numpy array "
        "(H, W, C), a PIL image or an image file's path"
    )


def _checked_tensor(image: Tensor, what: str) -> Tensor:
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3 or 0 in image.shape:
        raise DataError(
            f"expected an image tensor (C, H, W) or (H, W), got shape {tuple(image.shape)}; "
            "for several images use predict_batch"
        )
    if image.dtype == torch.uint8:
        return image
    if not image.is_floating_point():
        raise DataError(
            f"image {what} has dtype {str(image.dtype).replace('torch.', '')}; give uint8 "
            "(0-255) or floating point (0-1): scale 16-bit images to 8 bits first"
        )
    lo, hi = float(image.min()), float(image.max())
    if not (0.0 <= lo and hi <= 1.0):  # also catches NaN
        raise DataError(
            f"floating point image {what} holds values {lo:g} to {hi:g}; floats must be in 0-1 "
            "(for 0-255 values convert to uint8)"
        )
    return image


def _from_pil(img: Image.Image) -> Tensor:
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        raise DataError(
            f"PIL image of mode {img.mode} has no 8-bit scale; convert it to L or RGB, or give "
            "the file's path (16-bit files are scaled to 8 bits when read)"
        )
    if img.mode in ("1", "L", "LA", "La"):
        arr = np.asarray(img.convert("L"))[None]
    else:
        if img.mode in ("P", "PA"):
            img = img.convert("RGBA")  # a palette with transparency, without PIL's warning
        arr = np.asarray(img.convert("RGB")).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr).copy())


class Cancelled(Exception):
    """:attr:`Segmenter.should_stop` said to stop before a forward pass."""


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
        mode: ``"whole"``, ``"slide"`` or ``"overlap_tile"`` (see the module docstring).
        tile_size: for ``"overlap_tile"``: the largest tile side the network is fed, an int or
            ``(height, width)``; rounded down to a size the network accepts (572 for the paper's
            U-Net gives 388x388 output tiles).
        fast: the torch path the forward pass takes (:mod:`denseseg.inference.fast`; weights
            captured at the first call): ``False`` eager, ``True`` the fast default (a frozen
            TorchScript trace per input shape; :func:`denseseg.load_model` resolves it to the
            path ``denseseg benchmark --save`` measured fastest for a packed model), or a path
            name: ``"eager"``, ``"channels_last"`` (batch norm folded, NHWC), ``"trace"``,
            ``"compile"`` (``torch.compile``, slow first call per input shape).
        tta: test-time augmentation, ``"none"``, ``"hflip"``, ``"d4"`` or ``"ms"`` (see the
            module docstring); costs 1, 2, 8 or ``2 * len(scales)`` passes.
        backend: where the forward pass runs, ``"torch"``, ``"onnxruntime"`` or
            ``"openvino"`` (see :mod:`denseseg.inference.runtimes`).
        precision: ``"fp32"`` or ``"bf16"`` (bfloat16 autocast where the device supports it).
        crop_size: for ``"slide"``: the window, an int or ``(height, width)`` (list or tuple);
            for ``"overlap_tile"``: the tile side, taking precedence over ``tile_size`` (the
            command line's ``--crop-size`` serves both). Ignored by ``"whole"``.
        stride: for ``"slide"``: the step between windows, an int or ``(height, width)`` at most
            the window; default two thirds of the window.
        weighting: for ``"slide"``: ``"uniform"`` (mean of the windows, as mmsegmentation) or
            ``"gaussian"`` (weights toward window centres, as nnU-Net).
        window_batch: for ``"slide"``: windows per forward pass; default 1 on a CPU (batching
            windows was no faster there and holds the activations of every window: measured
            with the ``camvid`` model, 360x480 windows, 2 threads) and 4 on a GPU.
        scales: for ``tta="ms"``: the image scales (default :data:`MS_SCALES`).

    Raises:
        ConfigError: an unknown mode, TTA or weighting, a window or tile that does not fit, or
            ``"slide"`` for a valid-padding network (its exact tiling is ``"overlap_tile"``).
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
        fast: bool | str = False,
        tta: str = "none",
        backend: str = "torch",
        precision: str = "fp32",
        crop_size: int | Sequence[int] | None = None,
        stride: int | Sequence[int] | None = None,
        weighting: str = "uniform",
        window_batch: int | None = None,
        scales: Sequence[float] | None = None,
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
        # Asked before every forward pass (window, tile, TTA pass): True stops the work with
        # Cancelled (a server whose client has given up).
        self.should_stop: Callable[[], bool] | None = None
        # As given, so that with_options can switch modes and keep the window or tile asked for.
        self._window_options = (tile_size, crop_size, stride, weighting, window_batch)
        self._set_mode(mode, tile_size, crop_size, stride, weighting, window_batch)
        self._set_tta(tta, scales)
        self.runtime = make_runtime(
            self.model,
            self.device,
            backend=backend,
            fast=fast,
            amp=self.amp,
            precision=precision,
        )

    def _set_mode(
        self,
        mode: str,
        tile_size: int | Sequence[int] | None,
        crop_size: int | Sequence[int] | None,
        stride: int | Sequence[int] | None,
        weighting: str,
        window_batch: int | None,
    ) -> None:
        """Check and keep the mode's settings (``tile_size`` for overlap tiles, the window of
        ``"slide"``)."""
        self.mode = mode
        tile = crop_size if mode == "overlap_tile" and crop_size is not None else tile_size
        self.tile_size = _check_mode(self.model, mode, tile, self.valid)
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown weighting {weighting!r}; choose {' or '.join(WEIGHTINGS)}")
        if window_batch is None:
            window_batch = 1 if self.device.type == "cpu" else 4
        if isinstance(window_batch, bool) or not isinstance(window_batch, int) or window_batch < 1:
            raise ConfigError(f"window_batch={window_batch!r} must be a whole number >= 1")
        self.weighting, self.window_batch = weighting, window_batch
        self.crop_size = self.stride = None
        if mode == "slide":
            self.crop_size, self.stride = check_window(crop_size, stride)

    def _set_tta(self, tta: str, scales: Sequence[float] | None) -> None:
        if tta not in TTA:
            raise ConfigError(
                f"unknown test-time augmentation tta={tta!r}; choose {', '.join(TTA)}"
            )
        if scales is not None and tta != "ms":
            raise ConfigError(f"scales apply to tta='ms' only; this Segmenter has tta={tta!r}")
        scales = MS_SCALES if scales is None else scales
        ok = isinstance(scales, Sequence) and len(scales) > 0
        if not ok or not all(isinstance(v, int | float) and 0 < v < math.inf for v in scales):
            raise ConfigError(f"scales={scales!r} must be a non-empty list of positive numbers")
        self.tta = tta
        self.scales = tuple(float(v) for v in scales)

    def with_options(self, *, mode: str | None = None, tta: str | None = None) -> Segmenter:
        """This Segmenter with another mode or test-time augmentation, checked as the
        constructor checks them; it shares the model and the runtime (no copy of the weights).

        Raises:
            ConfigError: the mode or TTA is unknown or does not fit the model and its window.
        """
        other = copy.copy(self)
        if mode is not None and mode != self.mode:
            other._set_mode(mode, *self._window_options)
        if tta is not None and tta != self.tta:
            other._set_tta(tta, self.scales if tta == "ms" and self.tta == "ms" else None)
        return other

    def supported_modes(self) -> list[str]:
        """The modes :meth:`with_options` accepts for this model and the window it was given."""
        ok = []
        for mode in MODES:
            try:
                self.with_options(mode=mode)
            except ConfigError:
                continue
            ok.append(mode)
        return ok

    def _transforms(self) -> tuple[tuple[float, int, bool], ...]:
        if self.tta == "ms":
            return tuple((s, 0, m) for s in self.scales for m in (False, True))
        return _TRANSFORMS[self.tta]

    # ---------------------------------------------------------------- preprocessing
    def preprocess(self, image: Tensor) -> Tensor:
        """uint8 ``(C, H, W)`` (or float in 0-1) -> normalised float32 ``(C, H, W)`` on the CPU."""
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
        raise DataError(
            f"image has {c} channels; the model takes {self.in_channels} (a tensor is (C, H, W); "
            "an (H, W, C) image: pass it as a numpy array)"
        )

    # ---------------------------------------------------------------- model call
    @contextmanager
    def _eval_mode(self) -> Iterator[None]:
        # Always infer in eval mode (batch norm running statistics, no dropout), even when the
        # trainer hands us a model it has put back into training mode; restore the mode after.
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    @property
    def passes(self) -> int:
        """Passes over each image: 1, or the number of test-time augmentation transforms."""
        return 1 if self.tta == "none" else len(self._transforms())

    @torch.no_grad()
    def logits(self, x: Tensor, on_pass: Callable[[], None] | None = None) -> Tensor:
        """Logits for a normalised batch ``(N, C, H, W)`` -> ``(N, K, H, W)`` (K = 1 for binary).

        Valid-padding models are run through the tiler (one tile in ``"whole"`` mode) so the
        output covers every pixel. With test-time augmentation the returned logits are the log
        of the averaged probabilities (logit of the averaged sigmoid for a binary model), so
        that softmax, sigmoid and arg-max of them are those of the average. ``on_pass`` is
        called after each of the :attr:`passes` (e.g. to move a progress bar).
        """
        x = x.to(self.device)
        tick = on_pass or (lambda: None)
        with self._eval_mode():
            if self.tta == "none":
                out = self._single_logits(x)
                tick()
                return out
            return self._tta_logits(x, self._transforms(), tick)

    def _single_logits(self, x: Tensor) -> Tensor:
        """One pass in the Segmenter's mode: ``x (N, C, H, W)`` -> float32 ``(N, K, H, W)``."""
        if self.valid:
            h, w = x.shape[-2:]
            return self._tiled_logits(x, self.tile_size).float()[..., :h, :w]
        if self.mode != "slide":
            return self._model_logits(x)
        fetch = lambda top, left, h, w: x[..., top : top + h, left : left + w]  # noqa: E731
        strips = list(self._slide(fetch, x.shape[-2:]))
        return strips[0][1] if len(strips) == 1 else torch.cat([s for _, s in strips], -2)

    def _model_logits(self, x: Tensor) -> Tensor:
        """The model on ``x (N, C, H, W)``: float32 logits ``(N, K, H, W)``, resized to ``x``
        where a model returns a smaller map."""
        h, w = x.shape[-2:]
        out = self._forward(x).float()[..., :h, :w]
        if out.shape[-2:] != (h, w):
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        return out

    def _slide(
        self, fetch: Any, size: Sequence[int], mirror: bool = False
    ) -> Iterator[tuple[int, Tensor]]:
        assert self.crop_size is not None and self.stride is not None
        return slide_strips(
            fetch,
            self._model_logits,
            (int(size[0]), int(size[1])),
            self.crop_size,
            self.stride,
            gaussian=self.weighting == "gaussian",
            window_batch=self.window_batch,
            mirror=mirror,
        )

    def _tta_logits(
        self,
        x: Tensor,
        transforms: Sequence[tuple[float, int, bool]],
        on_pass: Callable[[], None] = lambda: None,
    ) -> Tensor:
        h, w = x.shape[-2:]
        total: Tensor | None = None
        for scale, k, mirror in transforms:
            y = x
            if scale != 1.0:  # as mmsegmentation's Resize: round(side * scale), bilinear
                size = (max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5)))
                y = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            y = y.flip(-1) if mirror else y
            out = self._single_logits(torch.rot90(y, k, (-2, -1)))
            out = torch.rot90(out, -k, (-2, -1))
            out = out.flip(-1) if mirror else out
            if scale != 1.0:  # logits back to the image's size, then the softmax
                out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
            p = torch.sigmoid(out) if self.binary else out.softmax(1)
            total = p if total is None else total + p
            on_pass()
        assert total is not None
        return self._mean_to_logits(total, len(transforms))

    def _mean_to_logits(self, total: Tensor, count: int) -> Tensor:
        """Summed probabilities of ``count`` passes -> logits of their mean."""
        p = (total / count).clamp_min(1e-12)
        if self.binary:
            return torch.log(p) - torch.log1p(-p.clamp_max(1 - 1e-7))
        return torch.log(p)

    def _forward(self, x: Tensor) -> Tensor:
        if self.should_stop is not None and self.should_stop():
            raise Cancelled("segmentation cancelled")
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
    def _labels(self, logits: Tensor) -> Tensor:
        """Logits ``(N, K, H, W)`` -> int64 labels ``(N, H, W)``."""
        if self.binary:
            return (torch.sigmoid(logits[:, 0]) > self.threshold).long()
        # The arg-max of the logits is the arg-max of the softmax; max().indices (first maximum
        # on ties, as argmax) is several times faster than argmax over channels on a CPU.
        return logits.max(1).indices

    @torch.no_grad()
    def predict_batch(
        self,
        images: Sequence[ImageLike],
        return_probs: bool = False,
        on_pass: Callable[[int, int], None] | None = None,
    ) -> tuple[list[Tensor], list[Tensor] | None]:
        """Segment images of possibly different sizes.

        In ``"whole"`` and ``"overlap_tile"`` mode the images share one forward pass (padded to
        a common size, each output cropped back); in ``"slide"`` mode each image slides on its
        own (its windows, not its neighbours' padding, decide its result).

        Args:
            images: images as :func:`as_image` takes them, typically uint8 tensors
                ``(C, H_i, W_i)``.
            return_probs: also return class probabilities ``(K, H_i, W_i)`` per image.
            on_pass: called as ``on_pass(done, total)`` after each forward pass over the batch
                (``total``: :attr:`passes`, times the images in ``"slide"`` mode).

        Returns:
            (labels, probs): int64 label maps ``(H_i, W_i)``, and probabilities or None.

        Raises:
            DataError: an input that is no image (see :func:`as_image`).
        """
        xs = [self.preprocess(as_image(im)) for im in images]
        groups = [[x] for x in xs] if self.mode == "slide" else [xs]
        labels, outs = [], []
        done, total = itertools.count(1), len(groups) * self.passes
        tick = (lambda: on_pass(next(done), total)) if on_pass is not None else None
        for group in groups:
            batch, sizes = pad_batch(group, value=0.0)
            logits = self.logits(batch, tick)
            labels_b = self._labels(logits)
            probs = torch.sigmoid(logits) if self.binary else None
            if return_probs and not self.binary:
                probs = logits.softmax(1)  # only when asked for
            for i, (h, w) in enumerate(sizes):
                labels.append(labels_b[i, :h, :w].cpu())
                if return_probs:
                    assert probs is not None
                    p = probs[i, :, :h, :w]
                    outs.append((torch.cat([1 - p, p], 0) if self.binary else p).cpu())
        return labels, (outs if return_probs else None)

    def predict(self, image: ImageLike) -> Tensor:
        """Segment one image (see :func:`as_image`: uint8 ``(C, H, W)`` tensor, ``(H, W, C)``
        array, PIL image or path) -> int64 label map ``(H, W)``."""
        return self.predict_batch([image])[0][0]

    def predict_proba(self, image: ImageLike) -> Tensor:
        """Class probabilities ``(K, H, W)`` for one image (as :meth:`predict` takes it)."""
        probs = self.predict_batch([image], return_probs=True)[1]
        assert probs is not None
        return probs[0]

    # ---------------------------------------------------------------- huge images
    def streams(self) -> bool:
        """Whether :meth:`predict_large` can stream this Segmenter's setting: ``"slide"`` or
        ``"overlap_tile"`` mode with ``tta`` ``"none"`` or ``"hflip"`` (row strips stay row
        strips under a horizontal flip, not under rotations or resizing)."""
        return self.mode in ("slide", "overlap_tile") and self.tta in _STREAMED_TTA

    @torch.no_grad()
    def predict_large(self, image: ImageLike) -> Tensor:
        """Segment an image of any size in memory bounded by a strip of windows.

        Windows (``"slide"``) or tiles (``"overlap_tile"``) are run one row at a time, each
        window normalised on its own (no float copy of the image), and each finished row strip
        is turned into labels at once (:meth:`predict_strips`): besides the image and the labels
        only one strip of logits, ``K x crop_h x W`` float32 (twice with ``"hflip"``), and the
        model's activations for ``window_batch`` windows are alive. The labels equal
        :meth:`predict`'s.

        Args:
            image: as :func:`as_image` takes it; a numpy ``(H, W, C)`` array is used in place.

        Returns:
            Labels ``(H, W)``: uint8 (int32 for models of more than 256 classes), on the CPU.

        Raises:
            ConfigError: a mode or TTA that does not stream (see :meth:`streams`); use
                :meth:`predict`.
        """
        source = ImageRows(as_image(image))
        _, h, w = source.shape
        labels: Tensor | None = None
        for top, block in self.predict_strips(source):
            if labels is None:
                labels = torch.empty((h, w), dtype=block.dtype)
            labels[top : top + block.shape[0]] = block
        assert labels is not None
        return labels

    @torch.no_grad()
    def predict_strips(self, source: ImageRows) -> Iterator[tuple[int, Tensor]]:
        """The labels of an image, top to bottom, as its row strips are finished.

        Args:
            source: the image's rows: :class:`~denseseg.inference.slide.ImageRows` of a tensor,
                or :class:`~denseseg.inference.slide.StreamedRows` of a file being decoded (the
                image itself is then never whole in memory). The rows of each block are still
                in ``source`` when the block is handed out (for an overlay).

        Yields:
            ``(top, labels)``: uint8 labels ``(r, W)`` (int32 over 256 classes) of rows ``top ..
            top + r - 1``; the blocks follow each other and cover the image once.

        Raises:
            ConfigError: a mode or TTA that does not stream (see :meth:`streams`).
        """
        if not self.streams():
            raise ConfigError(
                f"predict_large streams mode slide or overlap_tile with tta none or hflip; this "
                f"Segmenter has mode={self.mode!r}, tta={self.tta!r}: use predict, or set "
                "mode='slide' with crop_size"
            )
        dtype = torch.uint8 if self.num_classes <= 256 else torch.int32
        mirrors = (False, True) if self.tta == "hflip" else (False,)
        with self._eval_mode():
            for parts in zip(*(self._strips(source, mirror) for mirror in mirrors)):
                top, first = parts[0]
                if len(parts) == 1:
                    logits = first
                else:  # as _tta_logits: probabilities averaged, then their logits
                    total = self._probs(first) + self._probs(parts[1][1])
                    logits = self._mean_to_logits(total, len(parts))
                yield top, self._labels(logits)[0].to(dtype).cpu()

    def _probs(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits) if self.binary else logits.softmax(1)

    def _strips(self, source: ImageRows, mirror: bool) -> Iterator[tuple[int, Tensor]]:
        """Row blocks ``(top, logits (1, K, r, W))`` of the image in ``source``, in this mode."""

        def prepare(window: Tensor) -> Tensor:
            return self.preprocess(window)[None].to(self.device)

        def fetch(top: int, left: int, h: int, w: int) -> Tensor:
            source.release(top)  # windows come row by row: rows above are done
            return prepare(source.rows(top, top + h)[..., left : left + w])

        _, h, w = source.shape
        if self.mode == "slide":
            return self._slide(fetch, (h, w), mirror)
        tile = self.tile_size
        plans = (
            plan_tiles(h, self.model, None if tile is None else tile[0]),
            plan_tiles(w, self.model, None if tile is None else tile[1]),
        )
        return tile_rows(source, plans, prepare, lambda x: self._forward(x).float(), mirror)

    def __repr__(self) -> str:
        name = self.meta.get("model_name", type(self.model).__name__)
        mode = self.mode if self.tile_size is None else f"{self.mode} {self.tile_size}"
        if self.mode == "slide":
            mode = f"slide {self.crop_size} stride {self.stride} {self.weighting}"
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
        raise ConfigError(f"unknown inference mode {mode!r}; choose {', '.join(MODES)}")
    if mode == "slide" and valid:
        # Windows would each lose their border to the valid convolutions; overlap tiles give
        # the exact whole-image result instead, with the same memory bound.
        raise ConfigError(
            "mode='slide' is for networks that pad their convolutions; this valid-padding "
            "network covers large images with mode='overlap_tile' and tile_size (--crop-size)"
        )
    if mode in ("whole", "slide"):
        return None
    if not valid:
        raise ConfigError(
            "mode='overlap_tile' needs a valid-padding network (e.g. unet_valid); this model "
            "pads its convolutions, use mode='whole' or mode='slide'"
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
