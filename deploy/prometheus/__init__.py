"""Prometheus configuration for the fraud worker: compose file, rules, and a renderer for tests."""
