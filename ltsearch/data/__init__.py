"""Data: sources → long-tailed subset → device tensors and samplers."""
from ltsearch.data.longtail import LongTailData, build_data, class_counts, select_longtail
from ltsearch.data.sources import DataError, ImageSet

__all__ = ["LongTailData", "build_data", "class_counts", "select_longtail", "DataError", "ImageSet"]
