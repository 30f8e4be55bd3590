"""``Segmenter``: the one inference entry point, used alike by predict, eval and serve.

It owns preprocessing (uint8 -> normalised float), batching of images of mixed sizes (padded to a
common size, each output cropped back to its own image), and turning logits into labels (argmax,
or a sigmoid threshold for binary models with one output channel). Whole-image inference is the
mode implemented here; valid-padding networks (the original U-Net) are fed a mirror-padded image
so that their centre-crop output covers the whole input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from denseseg.errors import ConfigError, DataError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available; use cpu")
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
    ) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        out_channels = int(getattr(model, "num_classes", 0) or 0)
        self.binary = out_channels == 1
        n = 2 if self.binary else out_channels
        self.class_names = list(class_names) if class_names else [f"class_{i}" for i in range(n)]
        self.num_classes = len(self.class_names)
        if palette is None:
            from denseseg.data.palette import default_palette

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

        Valid-padding models get a mirror-padded input so the output covers every pixel.
        """
        x = x.to(self.device)
        h, w = x.shape[-2:]
        if getattr(self.model, "padding", "same") == "valid":
            x = self._mirror_pad_for_valid(x)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            out = self.model(x)["out"]
        out = out.float()[..., :h, :w]
        if out.shape[-2:] != (h, w):
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        return out

    def _mirror_pad_for_valid(self, x: Tensor) -> Tensor:
        # The valid U-Net loses a fixed border on each side; feed it mirrored context so its
        # centre-crop output starts at the image's first pixel and covers the whole image
        # (the paper's overlap-tile idea, for a single tile).
        model: Any = self.model
        pads = []
        for n in x.shape[-2:]:
            size = model.valid_input_size(n)
            while model.output_size(size) < n:
                size = model.valid_input_size(size + 1)
            border = (size - model.output_size(size)) // 2
            pads.append((border, size - n - border))
        (top, bottom), (left, right) = pads
        return _reflect_pad(x, left, right, top, bottom)

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
        probs = torch.sigmoid(logits) if self.binary else logits.softmax(1)
        labels_b = (probs[:, 0] > self.threshold).long() if self.binary else probs.argmax(1)
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
        return f"Segmenter({name}, classes={self.num_classes}, device={self.device})"


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
