"""TLS, mTLS and SASL against a real broker: the local one started with ``tls=True`` (one per module).

The producer and the worker run as a user runs them (subprocesses, FRAUD_* variables) over each
secure listener; refused certificates and logins end in one line naming the setting to fix.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from kafka import KafkaAdminClient

from deploy.kafka.__main__ import print_secure_listeners
from deploy.kafka.local import BrokerState, LocalKafka, LocalKafkaError
from deploy.kafka.tls import issue, make_ca
from pipeline.config import KafkaSettings
from pipeline.errors import ConfigError
from pipeline.security import check_access
from tests.kafka_helpers import run_cli, with_shared_jars

pytestmark = pytest.mark.integration
ROWS = 150


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerState]:
    """A local broker with TLS, mTLS, SASL_SSL and wrong-host TLS listeners, for this module."""
    home = tmp_path_factory.mktemp("kafka-tls")
    with_shared_jars(home)
    broker = LocalKafka(home)
    try:
        state = broker.start(tls=True)
    except LocalKafkaError as err:
        pytest.fail(f"the local broker with TLS listeners did not start (needs Java 17+, Maven, openssl, "
                    f"keytool): {err}")
    try:
        yield state
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A CA that signed nothing the broker uses: its certificate and key."""
    return make_ca(tmp_path_factory.mktemp("other-ca"), "other")


def listener(state: BrokerState, name: str) -> dict[str, str]:
    """FRAUD_* variables that reach one secure listener with the right credentials."""
    assert state.ca_file and state.client_cert_file and state.client_key_file
    tls = {"FRAUD_SECURITY_PROTOCOL": "SSL", "FRAUD_SSL_CAFILE": state.ca_file}
    return {
        "tls": {**tls, "FRAUD_BOOTSTRAP_SERVERS": str(state.ssl_servers)},
        "mtls": {**tls, "FRAUD_BOOTSTRAP_SERVERS": str(state.mtls_servers),
                 "FRAUD_SSL_CERTFILE": state.client_cert_file, "FRAUD_SSL_KEYFILE": state.client_key_file,
                 "FRAUD_SSL_PASSWORD": str(state.client_key_password)},
        "scram": {**tls, "FRAUD_BOOTSTRAP_SERVERS": str(state.sasl_ssl_servers),
                  "FRAUD_SECURITY_PROTOCOL": "SASL_SSL", "FRAUD_SASL_MECHANISM": "SCRAM-SHA-512",
                  "FRAUD_SASL_USERNAME": str(state.sasl_username), "FRAUD_SASL_PASSWORD": str(state.sasl_password)},
        "wrong-host": {**tls, "FRAUD_BOOTSTRAP_SERVERS": str(state.wrong_host_servers)},
    }[name]


def cli_env(variables: dict[str, str]) -> dict[str, str]:
    """A subprocess environment with fresh topics and only these FRAUD_* settings."""
    tag = uuid.uuid4().hex[:10]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUD_")}
    return {**env, "PYTHONUNBUFFERED": "1", "FRAUD_INPUT_TOPIC": f"tx-{tag}", "FRAUD_ALERTS_TOPIC": f"alerts-{tag}",
            "FRAUD_DEAD_LETTER_TOPIC": f"dlq-{tag}", "FRAUD_CONNECT_TIMEOUT_S": "5", **variables}


@pytest.fixture(scope="module")
def stream_file(stream_frame: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stream") / "stream.parquet"
    stream_frame.head(ROWS).to_parquet(path)
    return path


def worker_args(model_dir: Path) -> list[str]:
    return ["--model-dir", str(model_dir), "--device", "cpu", "--metrics-port", "0", "--reload-interval-s", "0",
            "--consumer-group", f"g-{uuid.uuid4().hex[:8]}"]


@pytest.mark.parametrize("name", ["tls", "mtls", "scram"])
def test_producer_and_worker_over_a_secure_listener(secure: BrokerState, name: str, stream_file: Path,
                                                    model_dir: Path, kafka_client: str) -> None:
    env = {**cli_env(listener(secure, name)), "FRAUD_KAFKA_CLIENT": kafka_client}
    produced = run_cli("producer", "replay", str(stream_file), "--no-progress", env=env)
    assert f"{ROWS} acknowledged, 0 failed" in produced.stdout
    scored = run_cli("pipeline", *worker_args(model_dir), "--exit-when-idle", "6", env=env)
    assert f"consumed {ROWS}: {ROWS} scored, 0 dead-lettered" in scored.stdout, scored.stderr[-3000:]


def one_error_line(stderr: str) -> str:
    """The single error line of a refusal; no traceback, no kafka-python log line."""
    assert "Traceback" not in stderr and "kafka." not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr
    return errors[0]


REFUSALS = {
    "wrong CA": ("tls", {"FRAUD_SSL_CAFILE": "{other_ca}"},
                 r"its TLS certificate is not signed by a trusted CA \(self-signed certificate in certificate "
                 r"chain\); set FRAUD_SSL_CAFILE"),
    "no client certificate": ("mtls", {"FRAUD_SSL_CERTFILE": "", "FRAUD_SSL_KEYFILE": "", "FRAUD_SSL_PASSWORD": ""},
                              r"requires a client certificate \(mTLS: .*\); set FRAUD_SSL_CERTFILE and "
                              r"FRAUD_SSL_KEYFILE"),
    "wrong SCRAM password": ("scram", {"FRAUD_SASL_PASSWORD": "not-the-password"},
                             r"SCRAM-SHA-512 login of user 'alice'.*check FRAUD_SASL_USERNAME and "
                             r"FRAUD_SASL_PASSWORD"),
    "certificate for another host": ("wrong-host", {},
                                     r"its TLS certificate does not name this host \(IP address mismatch.*\); .*"
                                     r"set FRAUD_SSL_CHECK_HOSTNAME=false"),
}


@pytest.mark.parametrize("program", ["producer", "worker"])
@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_refusal_is_one_line_naming_the_setting(secure: BrokerState, other_ca: tuple[Path, Path],
                                                  stream_file: Path,
                                                  model_dir: Path, case: str, program: str) -> None:
    name, changes, message = REFUSALS[case]
    env = cli_env({**listener(secure, name), **{k: v.format(other_ca=other_ca[0]) for k, v in changes.items()}})
    if program == "producer":
        done = run_cli("producer", "replay", str(stream_file), "--no-progress", env=env, timeout_s=60, check=False)
        assert done.stderr.count("\n") == 1, done.stderr  # the producer says nothing else
    else:
        done = run_cli("pipeline", *worker_args(model_dir), env=env, timeout_s=60, check=False)
    assert done.returncode == 2, done.stderr
    assert re.search(message, one_error_line(done.stderr)), done.stderr


def test_hostname_check_off_reaches_a_broker_whose_certificate_names_another_host(secure: BrokerState,
                                                                                  stream_file: Path) -> None:
    env = cli_env({**listener(secure, "wrong-host"), "FRAUD_SSL_CHECK_HOSTNAME": "false"})
    produced = run_cli("producer", "replay", str(stream_file), "--no-progress", env=env)
    assert f"{ROWS} acknowledged, 0 failed" in produced.stdout


def settings_for(variables: dict[str, str]) -> KafkaSettings:
    return KafkaSettings.build(environ=variables)


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"])
def test_every_supported_sasl_mechanism_logs_in(secure: BrokerState, mechanism: str) -> None:
    settings = settings_for({**listener(secure, "scram"), "FRAUD_SASL_MECHANISM": mechanism})
    check_access(settings)
    admin = KafkaAdminClient(**settings.client_options(), bootstrap_timeout_ms=10_000)
    try:
        assert isinstance(admin.list_topics(), list)
    finally:
        admin.close()


def test_a_client_certificate_from_another_ca_is_refused_by_mtls(secure: BrokerState,
                                                                 other_ca: tuple[Path, Path], tmp_path: Path) -> None:
    cert, key = issue(other_ca, tmp_path, "stranger", "DNS:stranger", "clientAuth")
    settings = settings_for({**listener(secure, "mtls"), "FRAUD_SSL_CERTFILE": str(cert),
                             "FRAUD_SSL_KEYFILE": str(key), "FRAUD_SSL_PASSWORD": ""})
    with pytest.raises(ConfigError, match=r"refused the client certificate \(mTLS: .*\); set FRAUD_SSL_CERTFILE"):
        check_access(settings)


def test_hostname_check_off_still_checks_the_ca(secure: BrokerState, other_ca: tuple[Path, Path]) -> None:
    settings = settings_for({**listener(secure, "wrong-host"), "FRAUD_SSL_CHECK_HOSTNAME": "false",
                             "FRAUD_SSL_CAFILE": str(other_ca[0])})
    with pytest.raises(ConfigError, match=r"its TLS certificate is not signed by a trusted CA"):
        check_access(settings)


def test_a_wrong_key_password_names_the_key_files(secure: BrokerState) -> None:
    settings = settings_for({**listener(secure, "mtls"), "FRAUD_SSL_PASSWORD": "wrong"})
    with pytest.raises(ConfigError, match=r"cannot load the client certificate FRAUD_SSL_CERTFILE=.* with the key "
                                          r"FRAUD_SSL_KEYFILE=.*FRAUD_SSL_PASSWORD its password"):
        check_access(settings)


def test_a_file_that_is_not_a_certificate_names_the_variable(secure: BrokerState, tmp_path: Path) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    settings = settings_for({**listener(secure, "tls"), "FRAUD_SSL_CAFILE": str(bogus)})
    with pytest.raises(ConfigError, match=r"FRAUD_SSL_CAFILE=.*ca\.pem holds no PEM CA certificate"):
        check_access(settings)


def test_tls_to_a_plaintext_listener_says_so(secure: BrokerState) -> None:
    settings = settings_for({**listener(secure, "tls"), "FRAUD_BOOTSTRAP_SERVERS": secure.bootstrap_servers})
    with pytest.raises(ConfigError, match=r"does not speak TLS .*is it a TLS listener"):
        check_access(settings)


def test_start_tls_prints_the_settings_for_each_listener(secure: BrokerState,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    print_secure_listeners(secure)
    out = capsys.readouterr().out
    assert f"FRAUD_BOOTSTRAP_SERVERS={secure.ssl_servers} FRAUD_SECURITY_PROTOCOL=SSL" in out
    assert f"FRAUD_SSL_KEYFILE={secure.client_key_file}" in out and "FRAUD_SASL_MECHANISM=SCRAM-SHA-512" in out
    assert {Path(p).is_file() for p in (secure.ca_file, secure.client_cert_file, secure.client_key_file)} == {True}
