"""Say in one line why a TLS or SASL broker refuses us, before kafka-python retries in silence.

kafka-python 3.0 retries a failed TLS handshake or SASL login until its bootstrap timeout
(30 s) and then reports only ``Unable to bootstrap``; the reason is in its ERROR log lines,
some with a traceback. So, once a bootstrap server accepts TCP, :func:`check_access` loads
the certificate files as kafka-python will, opens one connection with kafka-python's own
connection code (TLS handshake, ApiVersions, SASL), and turns a refusal into a ConfigError
that names the setting to fix. Anything else (a timeout, a broker going away) is left to
the clients' own retries.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

from pipeline.config import KafkaSettings, env_name
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)
PROBE_TIMEOUT_MS = 10_000
# TLS alerts a broker sends when it requires a client certificate (mTLS) and has none it trusts
_CLIENT_CERTIFICATE_ALERTS = ("ALERT_BAD_CERTIFICATE", "ALERT_CERTIFICATE_UNKNOWN", "CERTIFICATE_REQUIRED",
                              "ALERT_UNKNOWN_CA")


def check_access(settings: KafkaSettings) -> None:
    """Raise ConfigError when the first bootstrap server refuses these TLS or SASL settings."""
    if not (settings.uses_tls or settings.sasl_mechanism):
        return
    if settings.uses_tls:
        check_tls_files(settings)
    error, reached_kafka = _connect_once(settings)
    if error is not None:
        message = explain(settings, error, reached_kafka)
        if message:
            raise ConfigError(message) from error
        log.debug("access check inconclusive (%r); the clients retry", error)


def check_tls_files(settings: KafkaSettings) -> None:
    """Load the CA, certificate and key as kafka-python will, naming the file that fails."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if settings.ssl_cafile:
        try:
            context.load_verify_locations(settings.ssl_cafile)
        except (ssl.SSLError, ValueError) as err:
            raise ConfigError(f"{env_name('ssl_cafile')}={settings.ssl_cafile} holds no PEM CA certificate "
                              f"({err}); set it to the CA that signed the broker's certificate") from err
    if settings.ssl_certfile:
        try:
            context.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile, password=settings.ssl_password)
        except ssl.SSLError as err:
            raise ConfigError(
                f"cannot load the client certificate {env_name('ssl_certfile')}={settings.ssl_certfile} with the "
                f"key {env_name('ssl_keyfile')}={settings.ssl_keyfile} ({err.reason or err}): both PEM, the key "
                f"the certificate's own, {env_name('ssl_password')} its password when it is encrypted") from err


def _connect_once(settings: KafkaSettings) -> tuple[Exception | None, bool]:
    """One connection as the clients make it: (its error or None, whether a Kafka answered ApiVersions)."""
    try:  # kafka-python's connection internals (3.x); without them, no check: the clients still work
        from kafka.net.manager import KafkaConnectionManager
        from kafka.net.selector import NetworkSelector
    except ImportError:
        return None, False
    options: dict[str, Any] = {**settings.client_options(), "client_id": f"{settings.client_id}-access-check"}
    kafka_logger = logging.getLogger("kafka")
    level = kafka_logger.level
    kafka_logger.setLevel(logging.CRITICAL + 1)  # its ERROR lines and tracebacks: the reason is said below
    net = NetworkSelector(**options)
    manager = KafkaConnectionManager(net, **options)
    conn = None
    try:
        node = manager.cluster.bootstrap_brokers()[0]
        conn = manager.get_connection(node.node_id, timeout_ms=min(PROBE_TIMEOUT_MS, settings.request_timeout_ms),
                                      pop_on_close=False, refresh_metadata_on_err=False)

        async def initialised() -> None:
            await conn

        net.run(initialised)
        return None, True
    except Exception as err:  # any failure is judged by explain(); unknown ones are left to the clients
        return err, conn is not None and conn.broker_version_data is not None
    finally:
        manager.close()
        net.close()
        kafka_logger.setLevel(level)


def explain(settings: KafkaSettings, error: Exception, reached_kafka: bool) -> str | None:
    """The one line that says what a refusal means and which setting fixes it; None when unsure."""
    text = str(error)
    where = f"Kafka at {settings.bootstrap_servers.split(',')[0].strip()}"
    if "CERTIFICATE_VERIFY_FAILED" in text:
        reason = text.split("certificate verify failed:")[-1].split("(_ssl.c")[0].strip()
        if "mismatch" in reason or "not valid for" in reason or "Hostname" in reason:
            return (f"{where}: its TLS certificate does not name this host ({reason}); connect with a name the "
                    f"certificate lists (its SAN), or set {env_name('ssl_check_hostname')}=false "
                    "(--no-ssl-check-hostname) to check the CA only")
        return (f"{where}: its TLS certificate is not signed by a trusted CA ({reason}); set "
                f"{env_name('ssl_cafile')} (--ssl-cafile) to the CA that signed it")
    if any(alert in text for alert in _CLIENT_CERTIFICATE_ALERTS):
        given = "refused the client certificate" if settings.ssl_certfile else "requires a client certificate"
        return (f"{where} {given} (mTLS: {text.split('] ')[-1].split(' (_ssl.c')[0]}); set "
                f"{env_name('ssl_certfile')} and {env_name('ssl_keyfile')} to a certificate its truststore's CA "
                "signed, and its key")
    if "Handshake failed" in text and ("WRONG_VERSION_NUMBER" in text or "EOF" in text):
        return (f"{where} does not speak TLS ({text.split('Handshake failed: ')[-1]}); is it a TLS listener? set "
                f"{env_name('security_protocol')} to what the listener expects, or "
                f"{env_name('bootstrap_servers')} to its TLS listener")
    if type(error).__name__ == "UnsupportedSaslMechanismError":
        return f"{where}: {text.split(': ', 1)[-1]}; set {env_name('sasl_mechanism')} to one it enables"
    login = f"{settings.sasl_mechanism} login of user {settings.sasl_username!r}"
    if type(error).__name__ == "SaslAuthenticationFailedError":
        return (f"{where} refused the {login} (invalid credentials); check {env_name('sasl_username')} and "
                f"{env_name('sasl_password')}")
    if settings.sasl_mechanism and reached_kafka and "disconnected" in text:
        # the broker closes the connection after a failed login; kafka-python often reports only the close
        return (f"{where} closed the connection during the {login}, as it does after a wrong user name or "
                f"password; check {env_name('sasl_username')} and {env_name('sasl_password')}")
    return None
