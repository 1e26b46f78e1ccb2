"""The streaming worker service: ``fraud-worker``.

Nothing here is imported by the producer or the trainer; they share only the contract
modules of :mod:`pipeline` (schema, features, preprocessing, models, artifact, scoring,
config, errors). Importing this package loads nothing heavy; :mod:`pipeline.worker.app`
holds the worker.
"""
