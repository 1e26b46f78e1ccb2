"""Benchmarks: scripts run as ``python bench/<script>.py``; the worker benchmark's parts live in ``bench.worker``."""
