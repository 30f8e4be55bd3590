"""COCO instance annotations, read through pycocotools, as semantic or instance targets.

Layout (the standard one; ``ann_file`` and ``img_dir`` name other places)::

    root/
      annotations/instances_<split>2017.json
      <split>2017/<file_name>.jpg

Semantic targets (``target="semantic"``, the default) paint each image's annotations into one
``int64 (H, W)`` map under a category mapping:

- default: the 80 COCO categories (ids 1-90 with gaps) -> contiguous ids 1-80 in id order,
  0 = background; ``category_map="file"`` takes the annotation file's own categories in id
  order instead (for COCO-format data sets with other categories); or a mapping
  ``{category id or name: class id}`` (a dict, or a YAML file with keys ``map`` and optional
  ``classes``), where categories left out stay background and class id 255 ignores them.
- where instances overlap, the smaller one (fewer mask pixels) wins: it is painted last. A small
  object lying on a large one (a cup on a table) would otherwise vanish from the map.
- crowd regions (``iscrowd: 1``) become 255 (ignored) except where a non-crowd instance covers
  them, since those pixels carry an exact label.

Instance targets (``target="instance"``) are dicts for instance segmentation models::

    {"boxes":    torchvision.tv_tensors.BoundingBoxes float32 (N, 4), XYXY pixels,
     "masks":    torchvision.tv_tensors.Mask uint8 (N, H, W),
     "labels":   int64 (N,)  mapped class ids (1..num_classes-1),
     "iscrowd":  int64 (N,),
     "area":     float32 (N,)  COCO's own ``area`` field,
     "image_id": int}

The ``tv_tensors`` types are plain tensors that torchvision.transforms.v2 moves together with the
image. Annotations whose category is unmapped (or mapped to 0 or 255) and boxes with no width or
height are left out, as torchvision's detection references do.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from torchvision import tv_tensors

from denseseg.data.datasets.base import SegmentationDataset, unknown_split
from denseseg.data.palette import default_palette
from denseseg.errors import ConfigError, DataError, require_extra

__all__ = ["COCO_CATEGORIES", "CocoDataset"]

COCO_CATEGORIES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus",
    7: "train", 8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant",
    13: "stop sign", 14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog",
    19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear", 24: "zebra",
    25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite",
    39: "baseball bat", 40: "baseball glove", 41: "skateboard", 42: "surfboard",
    43: "tennis racket", 44: "bottle", 46: "wine glass", 47: "cup", 48: "fork", 49: "knife",
    50: "spoon", 51: "bowl", 52: "banana", 53: "apple", 54: "sandwich", 55: "orange",
    56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut", 61: "cake",
    62: "chair", 63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet",
    72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone",
    78: "microwave", 79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book",
    85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear", 89: "hair drier",
    90: "toothbrush",
}  # fmt: skip
"""The 80 COCO 2017 object categories, ``{category id: name}``."""

_LAYOUT = "root/annotations/instances_<split>2017.json with images in root/<split>2017/"
_IGNORE = 255


def _load_coco(ann_file: Path) -> Any:
    COCO = require_extra("pycocotools.coco", "coco", "dataset 'coco'").COCO  # noqa: N806
    if not ann_file.is_file():
        raise DataError(f"annotation file {ann_file} does not exist; the layout is {_LAYOUT}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            return COCO(str(ann_file))
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise DataError(
            f"{ann_file} is not a COCO instances file ({type(exc).__name__}: {exc}); it needs "
            "'images', 'annotations' and 'categories'"
        ) from exc


def _resolve_paths(
    root: Path | None, split: str, ann_file: str | os.PathLike | None, img_dir: Any
) -> tuple[Path, Path]:
    if ann_file is not None:
        ann = Path(ann_file)
    elif root is None:
        raise ConfigError("dataset 'coco' needs a root folder or an explicit ann_file option")
    else:
        found = [root / "annotations" / f"instances_{s}.json" for s in (f"{split}2017", split)]
        ann = next((p for p in found if p.is_file()), found[0])
        if not ann.is_file():
            names = sorted(
                p.stem[len("instances_") :] for p in root.glob("annotations/instances_*.json")
            )
            available = [n[:-4] if n.endswith("2017") else n for n in names]
            raise unknown_split(root, split, available, f"expected {ann}; the layout is {_LAYOUT}")
    if img_dir is not None:
        images = Path(img_dir)
    elif root is None:
        raise ConfigError("dataset 'coco' with ann_file but no root needs the img_dir option")
    else:
        found = [root / f"{split}2017", root / split]
        images = next((p for p in found if p.is_dir()), found[0])
    if not images.is_dir():
        raise DataError(f"image folder {images} does not exist; the layout is {_LAYOUT}")
    return ann, images


def _parse_mapping(
    category_map: str | os.PathLike | Mapping[Any, int] | None,
    classes: list[str] | None,
    file_categories: dict[int, str],
) -> tuple[dict[int, int], list[str]]:
    """Resolve the mapping option to ``({category id: class id}, class names)``."""
    if category_map is None or category_map == "file":
        cats = COCO_CATEGORIES if category_map is None else file_categories
        if category_map is None:
            unknown = sorted(set(file_categories) - set(COCO_CATEGORIES))
            if unknown:
                raise DataError(
                    f"the annotation file has categories {unknown[:10]} that are not among the "
                    "80 COCO categories; pass category_map='file' or a mapping"
                )
        ids = sorted(cats)
        mapping = {cid: i + 1 for i, cid in enumerate(ids)}
        names = ["background", *(cats[c] for c in ids)]
        return mapping, list(classes) if classes is not None else names
    where = "category_map"
    if isinstance(category_map, str | os.PathLike):
        path = Path(category_map)
        where = str(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read category map {path} ({exc})") from exc
        if not isinstance(data, dict) or "map" not in data or set(data) - {"map", "classes"}:
            raise ConfigError(f"{path} must be a mapping with keys 'map' and optional 'classes'")
        category_map = data["map"]
        if classes is None and data.get("classes") is not None:
            classes = [str(c) for c in data["classes"]]
    if not isinstance(category_map, Mapping) or not category_map:
        raise ConfigError(f"{where}: the category mapping must be a non-empty dict")
    by_name = {name: cid for cid, name in file_categories.items()}
    mapping: dict[int, int] = {}
    for key, value in category_map.items():
        cid = by_name.get(key) if isinstance(key, str) and not key.isdigit() else int(key)
        if cid is None or cid not in file_categories:
            raise ConfigError(
                f"{where}: category {key!r} is not in the annotation file; its categories are "
                f"{sorted(file_categories.items())[:10]} ..."
            )
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{where}: class id for {key!r} must be an integer >= 0")
        mapping[cid] = value
    top = max((v for v in mapping.values() if v != _IGNORE), default=0)
    if classes is None:
        names = ["background"] + [
            "+".join(file_categories[c] for c in sorted(mapping) if mapping[c] == k) or f"class_{k}"
            for k in range(1, top + 1)
        ]
    else:
        names = list(classes)
        if len(names) <= top:
            raise ConfigError(f"{where}: class id {top} needs at least {top + 1} class names")
    return mapping, names


class CocoDataset(SegmentationDataset):
    """COCO (or any COCO-format instances file) as semantic or instance targets.

    Args:
        root: Folder holding ``annotations/`` and ``<split>2017/``; may be None when
            ``ann_file`` and ``img_dir`` are given.
        split: ``train``, ``val``, ... (``instances_<split>2017.json``, else
            ``instances_<split>.json``).
        transforms: Called as ``transforms(image, target)`` on each item.
        target: ``"semantic"`` or ``"instance"`` (see the module docstring).
        category_map: ``None`` (the 80 COCO categories), ``"file"``, a dict
            ``{category id or name: class id}``, or a YAML file path.
        classes: Class names, index = class id; defaults follow the mapping.
        ann_file: Explicit annotation file.
        img_dir: Explicit image folder.
        drop_empty: Leave out images with no mapped, non-crowd annotation.

    Attributes:
        coco: The ``pycocotools.coco.COCO`` index.
        image_ids: COCO image id of each item.
        files: ``[(image_path, ann_file), ...]``: masks come from the one annotation file.
    """

    expand_gray = True

    def __init__(
        self,
        root: str | os.PathLike | None,
        split: str = "train",
        transforms: Callable[[torch.Tensor, Any], Any] | None = None,
        target: Literal["semantic", "instance"] = "semantic",
        category_map: str | os.PathLike | Mapping[Any, int] | None = None,
        classes: list[str] | None = None,
        ann_file: str | os.PathLike | None = None,
        img_dir: str | os.PathLike | None = None,
        drop_empty: bool = False,
    ) -> None:
        if target not in ("semantic", "instance"):
            raise ConfigError(f"coco target must be 'semantic' or 'instance', got {target!r}")
        self.root = Path(root) if root is not None else Path(ann_file or ".").parent
        self.split = split
        self.transforms = transforms
        self.target = target
        self.ann_file, self.img_dir = _resolve_paths(
            Path(root) if root is not None else None, split, ann_file, img_dir
        )
        self.coco = _load_coco(self.ann_file)
        file_cats = {int(c["id"]): str(c["name"]) for c in self.coco.dataset.get("categories", [])}
        self.category_to_class, names = _parse_mapping(category_map, classes, file_cats)
        self._set_classes(names, default_palette(len(names)), ignore_index=_IGNORE)

        self.image_ids: list[int] = []
        self.files = []
        for image_id in sorted(self.coco.imgs):
            if drop_empty and not any(
                not a.get("iscrowd", 0)
                and self.category_to_class.get(a["category_id"], 0) not in (0, _IGNORE)
                for a in self.coco.imgToAnns.get(image_id, [])
            ):
                continue
            self.image_ids.append(image_id)
            self.files.append((self.img_dir / self.coco.imgs[image_id]["file_name"], self.ann_file))
        missing = [p for p, _ in self.files if not p.is_file()]
        if missing:
            more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
            raise DataError(
                f"image {missing[0]} named in {self.ann_file} does not exist{more}; "
                f"the layout is {_LAYOUT}"
            )

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, target={self.target!r})"

    def _masks(self, index: int) -> tuple[list[dict], list[np.ndarray]]:
        """The image's annotations with a mapped category, and their binary masks ``(H, W)``."""
        image_id = self.image_ids[index]
        anns = [
            a
            for a in self.coco.imgToAnns.get(image_id, [])
            if self.category_to_class.get(a["category_id"], 0) != 0
        ]
        masks = []
        for a in anns:
            try:
                with warnings.catch_warnings():
                    # pycocotools' decoder trips numpy 2's __array__(copy=...) deprecation on
                    # every call; the result is correct, the warning would flood training logs.
                    warnings.simplefilter("ignore", DeprecationWarning)
                    masks.append(self.coco.annToMask(a))
            except Exception as exc:  # pycocotools raises bare errors on malformed geometry
                raise DataError(
                    f"{self.ann_file}: annotation {a.get('id')} of image {image_id} has a "
                    f"malformed segmentation ({exc}); fix or remove it"
                ) from exc
        return anns, masks

    def semantic_target(self, index: int) -> torch.Tensor:
        """Paint the image's annotations into one class map.

        Args:
            index: Item index.

        Returns:
            ``int64 (H, W)``: 0 background, mapped class ids, 255 for crowd regions not covered
            by an instance; where instances overlap, the smaller one wins.
        """
        info = self.coco.imgs[self.image_ids[index]]
        out = np.zeros((info["height"], info["width"]), dtype=np.int64)
        anns, masks = self._masks(index)
        things = [(m, a) for m, a in zip(masks, anns, strict=True) if not a.get("iscrowd", 0)]
        # Largest first, so that smaller instances paint over it; ties in annotation id order.
        things.sort(key=lambda ma: (-int(ma[0].sum()), ma[1].get("id", 0)))
        covered = np.zeros(out.shape, dtype=bool)
        for mask, ann in things:
            region = mask.astype(bool)
            out[region] = self.category_to_class[ann["category_id"]]
            covered |= region
        for mask, ann in zip(masks, anns, strict=True):
            if ann.get("iscrowd", 0):
                out[mask.astype(bool) & ~covered] = _IGNORE
        return torch.from_numpy(out)

    def instance_target(self, index: int) -> dict[str, Any]:
        """The image's instances as the dict described in the module docstring."""
        info = self.coco.imgs[self.image_ids[index]]
        h, w = info["height"], info["width"]
        anns, masks = self._masks(index)
        keep = [
            i for i, a in enumerate(anns) if self.category_to_class[a["category_id"]] != _IGNORE
        ]
        boxes = torch.tensor([anns[i]["bbox"] for i in keep], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        valid = ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).tolist()
        keep = [k for k, ok in zip(keep, valid, strict=True) if ok]
        boxes = boxes[torch.tensor(valid, dtype=torch.bool)] if valid else boxes
        stacked = np.stack([masks[i] for i in keep]) if keep else np.zeros((0, h, w), np.uint8)
        return {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            "masks": tv_tensors.Mask(torch.from_numpy(stacked.astype(np.uint8))),
            "labels": torch.tensor(
                [self.category_to_class[anns[i]["category_id"]] for i in keep], dtype=torch.int64
            ),
            "iscrowd": torch.tensor(
                [int(anns[i].get("iscrowd", 0)) for i in keep], dtype=torch.int64
            ),
            "area": torch.tensor(
                [float(anns[i].get("area", 0.0)) for i in keep], dtype=torch.float32
            ),
            "image_id": int(self.image_ids[index]),
        }

    def load_target(self, index: int) -> Any:
        """The target without the image: ``int64 (H, W)`` map, or the instance dict."""
        if self.target == "instance":
            return self.instance_target(index)
        return self.semantic_target(index)

    def load(self, index: int) -> tuple[torch.Tensor, Any]:
        """Read one item without transforms.

        Returns:
            ``(image uint8 (3, H, W), target)``; the target as :meth:`load_target` gives it.

        Raises:
            DataError: Unreadable image, or an image whose size differs from the annotation
                file's ``height``/``width``.
        """
        image = self.load_image(index)
        info = self.coco.imgs[self.image_ids[index]]
        if tuple(image.shape[1:]) != (info["height"], info["width"]):
            raise DataError(
                f"image {self.files[index][0]} is {image.shape[1]}x{image.shape[2]} (HxW) but "
                f"{self.ann_file} says {info['height']}x{info['width']}; the image does not "
                "belong to these annotations"
            )
        return image, self.load_target(index)
