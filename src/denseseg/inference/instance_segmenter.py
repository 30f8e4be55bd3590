"""``InstanceSegmenter``: inference for instance models (Mask R-CNN), as :class:`Segmenter` is
for semantic ones.

The model resizes and normalises inside, so the predictor only turns ``uint8`` images into 0-1
floats, batches them (the model pads a batch itself), and binarises the soft masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from denseseg.errors import DataError
from denseseg.inference.segmenter import resolve_device

__all__ = ["InstanceSegmenter", "to_model_inputs"]


def to_model_inputs(images: Sequence[Tensor]) -> list[Tensor]:
    """``uint8`` (or float 0-1) images ``(C, H, W)`` -> float 0-1 RGB images ``(3, H, W)``.

    Args:
        images: one or three channels each.

    Returns:
        What an instance model takes (grayscale repeated to RGB).
    """
    out = []
    for image in images:
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise DataError(
                f"expected an image tensor (C, H, W) with 1 or 3 channels, got {tuple(image.shape)}"
            )
        x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        out.append(x.expand(3, -1, -1) if x.shape[0] == 1 else x)
    return out


class InstanceSegmenter:
    """Run an instance segmentation model on images.

    Args:
        model: a model with ``task = "instance"`` (eval mode returns per image ``boxes``,
            ``labels``, ``scores`` and ``masks (N, 1, H, W)`` probabilities).
        class_names: names of the classes, index = label (0 is background).
        palette: one RGB colour per class (kept for callers; instances are drawn in colours of
            their own).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        threshold: mask probability at or above which a pixel belongs to the instance.
        score_threshold: detections scoring below this are dropped (0 keeps what the model
            returns; COCO evaluation wants them all).
        meta: free-form information kept with the model (name, kwargs, checkpoint, category
            ids of the classes).
    """

    task = "instance"

    def __init__(
        self,
        model: nn.Module,
        *,
        class_names: Sequence[str] | None = None,
        palette: Sequence[Sequence[int]] | None = None,
        device: str | torch.device = "auto",
        threshold: float = 0.5,
        score_threshold: float = 0.0,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        n = int(getattr(model, "num_classes", 0) or 0)
        self.class_names = list(class_names) if class_names else [f"class_{i}" for i in range(n)]
        self.num_classes = len(self.class_names)
        if palette is None:
            from denseseg.data.palette import default_palette

            palette = default_palette(self.num_classes)
        self.palette = [tuple(int(c) for c in p) for p in palette]
        self.threshold = threshold
        self.score_threshold = score_threshold
        self.meta = dict(meta or {})
        # COCO evaluation counts at most this many detections per image.
        self.max_detections = int(
            getattr(getattr(model, "roi_heads", None), "detections_per_img", 100)
        )

    @torch.no_grad()
    def predict_batch(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Predict instances in images of any sizes.

        Args:
            images: ``uint8 (C, H_i, W_i)`` tensors, ``C`` 1 or 3.

        Returns:
            Per image, on the CPU: ``boxes float32 (N, 4)`` XYXY pixels, ``labels int64 (N,)``,
            ``scores float32 (N,)`` in decreasing order, ``masks bool (N, H_i, W_i)``.
        """
        was_training = self.model.training
        self.model.eval()
        try:
            xs = [x.to(self.device) for x in to_model_inputs(images)]
            outs = self.model(xs) if xs else []
        finally:
            self.model.train(was_training)
        results = []
        for out in outs:
            keep = out["scores"] >= self.score_threshold
            results.append(
                {
                    "boxes": out["boxes"][keep].float().cpu(),
                    "labels": out["labels"][keep].cpu(),
                    "scores": out["scores"][keep].float().cpu(),
                    "masks": (out["masks"][keep, 0] >= self.threshold).cpu(),
                }
            )
        return results

    def predict(self, image: Tensor) -> dict[str, Tensor]:
        """Instances of one ``uint8 (C, H, W)`` image (see :meth:`predict_batch`)."""
        return self.predict_batch([image])[0]

    def __repr__(self) -> str:
        name = self.meta.get("model_name", type(self.model).__name__)
        return f"InstanceSegmenter({name}, classes={self.num_classes}, device={self.device})"
