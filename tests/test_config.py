"""Settings: defaults, then FRAUD_* variables, then flags; bad values refused with a fix."""

from __future__ import annotations

import argparse

import pytest

from pipeline.config import KafkaSettings, WorkerSettings
from pipeline.errors import ConfigError


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    KafkaSettings.add_arguments(parser)
    return parser.parse_args(argv)


def test_flag_beats_env_beats_default() -> None:
    env = {"FRAUD_INPUT_TOPIC": "from-env", "FRAUD_ALERTS_TOPIC": "alerts-env"}
    s = KafkaSettings.build(parse(["--input-topic", "from-flag"]), environ=env)
    assert s.input_topic == "from-flag"
    assert s.alerts_topic == "alerts-env"
    assert s.dead_letter_topic == "transactions-dlq"


def test_help_names_the_env_var() -> None:
    parser = argparse.ArgumentParser()
    KafkaSettings.add_arguments(parser)
    assert "FRAUD_BOOTSTRAP_SERVERS" in parser.format_help()


def test_secret_is_masked() -> None:
    s = KafkaSettings.build(environ={"FRAUD_SASL_PASSWORD": "hunter2",
                                     "FRAUD_SECURITY_PROTOCOL": "SASL_SSL",
                                     "FRAUD_SASL_MECHANISM": "PLAIN"})
    assert "hunter2" not in str(s) and "hunter2" not in repr(s)
    assert s.client_options()["sasl_plain_password"] == "hunter2"


@pytest.mark.parametrize("settings, env, message", [
    (KafkaSettings, {"FRAUD_REQUEST_TIMEOUT_MS": "soon"}, "FRAUD_REQUEST_TIMEOUT_MS"),
    (KafkaSettings, {"FRAUD_SECURITY_PROTOCOL": "TLS"}, "must be one of"),
    (KafkaSettings, {"FRAUD_ALERTS_TOPIC": "transactions"}, "must differ"),
    (KafkaSettings, {"FRAUD_SECURITY_PROTOCOL": "SASL_SSL"}, "--sasl-mechanism"),
    (KafkaSettings, {"FRAUD_BOOTSTRAP_SERVERS": " "}, "bootstrap_servers is empty"),
    (WorkerSettings, {"FRAUD_TORCH_THREADS": "-1"}, "torch_threads=-1 must be >= 0"),
    (WorkerSettings, {"FRAUD_DEVICE": "gpu"}, "use auto, cpu, cuda or cuda:N"),
    (WorkerSettings, {"FRAUD_MAX_BATCH": "0"}, "max_batch=0"),
])
def test_bad_settings_are_refused_with_a_fix(settings: type, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings.build(environ=env)


def test_settings_are_frozen() -> None:
    s = KafkaSettings.build(environ={})
    with pytest.raises(AttributeError):
        s.input_topic = "x"  # type: ignore[misc]
