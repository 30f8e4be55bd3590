"""Inference: the one entry point, :class:`Segmenter`."""

from denseseg.inference.segmenter import Segmenter

__all__ = ["Segmenter"]
