"""Streaming fraud-detection worker and the record contract shared with producer and trainer."""

__version__ = "0.1.0"
