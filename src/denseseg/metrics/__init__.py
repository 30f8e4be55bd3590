"""Semantic-segmentation metrics: one streaming confusion matrix, every metric, and reports."""

from denseseg.metrics.confusion import (
    ABSENT_POLICIES,
    SegmentationMetrics,
    count_pairs,
    format_table,
    metrics_from_confusion,
    save_results,
)

__all__ = [
    "ABSENT_POLICIES",
    "SegmentationMetrics",
    "count_pairs",
    "format_table",
    "metrics_from_confusion",
    "save_results",
]
