"""Accuracy and latency of every model and format, side by side: ``python -m benchmarks``."""
