"""How a refused TLS handshake or SASL login is explained (no broker: the errors kafka-python raises)."""

from __future__ import annotations

import pytest
from kafka.errors import KafkaConnectionError, SaslAuthenticationFailedError, UnsupportedSaslMechanismError

from pipeline.config import KafkaSettings
from pipeline.security import check_access, explain

TLS = KafkaSettings.build(environ={"FRAUD_SECURITY_PROTOCOL": "SSL", "FRAUD_BOOTSTRAP_SERVERS": "b1:9093,b2:9093"})
SCRAM = KafkaSettings.build(environ={"FRAUD_SECURITY_PROTOCOL": "SASL_SSL", "FRAUD_SASL_MECHANISM": "SCRAM-SHA-512",
                                     "FRAUD_SASL_USERNAME": "alice", "FRAUD_SASL_PASSWORD": "pw",
                                     "FRAUD_BOOTSTRAP_SERVERS": "b1:9093"})
VERIFY = "Handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {} (_ssl.c:1006)"


@pytest.mark.parametrize("settings, error, reached, expected", [
    (TLS, KafkaConnectionError(VERIFY.format("unable to get local issuer certificate")), False,
     "Kafka at b1:9093: its TLS certificate is not signed by a trusted CA (unable to get local issuer certificate); "
     "set FRAUD_SSL_CAFILE (--ssl-cafile) to the CA that signed it"),
    (TLS, KafkaConnectionError(VERIFY.format("Hostname mismatch, certificate is not valid for 'b1'.")), False,
     "Kafka at b1:9093: its TLS certificate does not name this host (Hostname mismatch, certificate is not valid "
     "for 'b1'.); connect with a name the certificate lists (its SAN), or set FRAUD_SSL_CHECK_HOSTNAME=false "
     "(--no-ssl-check-hostname) to check the CA only"),
    (TLS, KafkaConnectionError("[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required "
                               "(_ssl.c:2580)"), False,
     "Kafka at b1:9093 requires a client certificate (mTLS: tlsv13 alert certificate required); set "
     "FRAUD_SSL_CERTFILE and FRAUD_SSL_KEYFILE to a certificate its truststore's CA signed, and its key"),
    (SCRAM, SaslAuthenticationFailedError("invalid credentials"), True,
     "Kafka at b1:9093 refused the SCRAM-SHA-512 login of user 'alice' (invalid credentials); check "
     "FRAUD_SASL_USERNAME and FRAUD_SASL_PASSWORD"),
    (SCRAM, KafkaConnectionError("socket disconnected"), True,
     "Kafka at b1:9093 closed the connection during the SCRAM-SHA-512 login of user 'alice', as it does after a "
     "wrong user name or password; check FRAUD_SASL_USERNAME and FRAUD_SASL_PASSWORD"),
    (SCRAM, UnsupportedSaslMechanismError("Kafka broker does not support SCRAM-SHA-512 sasl mechanism. Enabled "
                                          "mechanisms: ['PLAIN']"), True,
     "Kafka at b1:9093: Kafka broker does not support SCRAM-SHA-512 sasl mechanism. Enabled mechanisms: ['PLAIN']; "
     "set FRAUD_SASL_MECHANISM to one it enables"),
])
def test_refusals_name_the_setting_to_fix(settings: KafkaSettings, error: Exception, reached: bool,
                                          expected: str) -> None:
    assert explain(settings, error, reached) == expected


@pytest.mark.parametrize("settings, error, reached", [
    (SCRAM, KafkaConnectionError("socket disconnected"), False),  # before ApiVersions: not the login
    (TLS, KafkaConnectionError("socket disconnected"), True),
    (TLS, TimeoutError("timed out"), False),
])
def test_what_is_not_a_refusal_is_left_to_the_clients(settings: KafkaSettings, error: Exception,
                                                      reached: bool) -> None:
    assert explain(settings, error, reached) is None


def test_plaintext_is_not_checked() -> None:
    check_access(KafkaSettings.build(environ={"FRAUD_BOOTSTRAP_SERVERS": "127.0.0.1:1"}))  # no connection tried
