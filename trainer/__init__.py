"""Fits, calibrates, evaluates and exports the autoencoder that the worker serves."""
