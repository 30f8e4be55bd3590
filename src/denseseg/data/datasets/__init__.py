"""The benchmark datasets in the layouts they ship in, one module per format.

Every reader subclasses :class:`~denseseg.data.datasets.base.SegmentationDataset` (as the
generic :class:`~denseseg.data.folder.FolderDataset` does), so all share the attributes
``classes``, ``num_classes``, ``palette``, ``ignore_index``, ``in_channels`` and ``files``, the
methods ``load``, ``load_target`` and ``check``, and items ``(image uint8 (C, H, W),
target int64 (H, W))``. Open them by name with :func:`denseseg.data.registry.get_dataset`.

==============  ==========================  ==================================================
name            class                       layout
==============  ==========================  ==================================================
``voc``         :class:`VOCDataset`         VOCdevkit/VOC2012 (+ SegmentationClassAug)
``cityscapes``  :class:`CityscapesDataset`  leftImg8bit + gtFine
``ade20k``      :class:`ADE20KDataset`      ADEChallengeData2016
``camvid``      :class:`CamVidDataset`      SegNet's train/trainannot/...
``isbi2012``    :class:`ISBI2012Dataset`    image/ + label/
``coco``        :class:`CocoDataset`        annotations/instances_*.json + images
==============  ==========================  ==================================================
"""

from denseseg.data.datasets.ade20k import ADE20KDataset, ade20k_to_submission
from denseseg.data.datasets.base import SegmentationDataset
from denseseg.data.datasets.camvid import CamVidDataset
from denseseg.data.datasets.cityscapes import CityscapesDataset, cityscapes_to_label_ids
from denseseg.data.datasets.coco import CocoDataset
from denseseg.data.datasets.isbi2012 import ISBI2012Dataset
from denseseg.data.datasets.voc import VOCDataset

__all__ = [
    "ADE20KDataset",
    "CamVidDataset",
    "CityscapesDataset",
    "CocoDataset",
    "ISBI2012Dataset",
    "SegmentationDataset",
    "VOCDataset",
    "ade20k_to_submission",
    "cityscapes_to_label_ids",
]
