"""One exception tree for the project: each error says what is wrong and how to fix it."""

from __future__ import annotations


class FraudPipelineError(Exception):
    """Base of every error this project raises on purpose."""

    retriable = False


class ConfigError(FraudPipelineError):
    """A setting is missing, malformed or contradicts another one."""


class InputDataError(FraudPipelineError):
    """A file or table cannot be used: missing column, non-numeric values, empty set."""


class ModelArtifactError(FraudPipelineError):
    """A model directory is missing, corrupted, tampered with or of an unknown format."""


class BrokerError(FraudPipelineError):
    """Kafka did not answer or refused a request."""

    retriable = True
