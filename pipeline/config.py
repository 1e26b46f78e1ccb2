"""Settings shared by the producer, the worker and the trainer.

Every setting has one environment variable (prefix ``FRAUD_``) and one command-line
flag; the flag wins over the variable, the variable over the default. A settings
object is built once, in ``main``, and is frozen afterwards.

>>> s = KafkaSettings.build(environ={"FRAUD_INPUT_TOPIC": "tx"}, overrides={})
>>> s.input_topic
'tx'
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Self

from pipeline.errors import ConfigError

ENV_PREFIX = "FRAUD_"
_MASK = "***"


def setting(default: Any, help: str, *, secret: bool = False, choices: tuple = ()) -> Any:
    """Declare a settings field: its default, its help text, whether to mask it."""
    meta = {"help": help, "secret": secret, "choices": choices}
    return field(default=default, metadata=meta)


NOT_SETTINGS = ("FRAUD_IMAGE_TAG",)  # FRAUD_* variables read by other tools (docker-compose.yml's image tag)
_warned: set[str] = set()


def warn_unknown(env: Mapping[str, str]) -> list[str]:
    """Say once per process, naming the nearest setting, which ``FRAUD_*`` variables no setting reads: a
    misspelled one (FRAUD_BOOTSTRAP_SERVER) is otherwise ignored without a word. The names said."""
    import difflib

    known = {env_name(f.name) for cls in _settings_classes() for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(n for n in env if n.startswith(ENV_PREFIX) and n not in known and n not in NOT_SETTINGS
                     and n not in _warned)
    for name in unknown:
        _warned.add(name)
        near = difflib.get_close_matches(name, sorted(known), n=1)
        logging.getLogger(__name__).warning("%s is not a setting%s; ignored", name,
                                            f" (did you mean {near[0]}?)" if near else "")
    return unknown


def _settings_classes() -> list[type]:
    found, todo = [], list(SettingsBase.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return found


def env_name(field_name: str) -> str:
    """The environment variable behind a settings field."""
    return ENV_PREFIX + field_name.upper()


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _convert(name: str, raw: Any, kind: type, choices: tuple) -> Any:
    if raw is None:
        return None
    try:
        if kind is bool and isinstance(raw, str):
            lowered = raw.strip().lower()
            if lowered not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                raise ValueError(raw)
            value: Any = lowered in {"1", "true", "yes", "on"}
        else:
            value = kind(raw)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"{name}={raw!r} is not a valid {kind.__name__}; set {_flag(name)} "
            f"or {env_name(name)} to a {kind.__name__}"
        ) from err
    if choices and value not in choices:
        raise ConfigError(f"{name}={value!r} must be one of {', '.join(map(str, choices))}")
    return value


class SettingsBase:
    """Mixin: build a frozen dataclass of settings from defaults, env and flags."""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one flag per field; its help names the environment variable behind it."""
        group = parser.add_argument_group(cls.__name__)
        for f in fields(cls):  # type: ignore[arg-type]
            meta = f.metadata
            kind = _field_type(f)
            shown = _MASK if meta["secret"] and f.default else f.default
            help_text = f"{meta['help']} [env {env_name(f.name)}; default {shown}]"
            if kind is bool:
                group.add_argument(
                    _flag(f.name), dest=f.name, default=None,
                    action=argparse.BooleanOptionalAction, help=help_text,
                )
            else:
                group.add_argument(_flag(f.name), dest=f.name, default=None, help=help_text)

    @classmethod
    def build(
        cls,
        args: argparse.Namespace | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Self:
        """Defaults, then ``FRAUD_*`` variables, then flags in ``args``, then ``overrides``."""
        env = os.environ if environ is None else environ
        warn_unknown(env)
        given = vars(args) if args is not None else {}
        values: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            kind = _field_type(f)
            raw = f.default
            if env_name(f.name) in env:
                raw = env[env_name(f.name)]
            if given.get(f.name) is not None:
                raw = given[f.name]
            if overrides and f.name in overrides:
                raw = overrides[f.name]
            values[f.name] = _convert(f.name, raw, kind, f.metadata["choices"])
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Refuse contradictory settings; subclasses extend."""

    def replace(self, **changes: Any) -> Self:
        """A copy with some fields changed, validated again."""
        new = dataclasses.replace(self, **changes)  # type: ignore[type-var]
        new.validate()
        return new

    def __str__(self) -> str:
        parts = []
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.metadata["secret"] and value:
                value = _MASK
            parts.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    __repr__ = __str__


_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "str | None": str}


def _field_type(f: dataclasses.Field) -> type:
    annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
    try:
        return _TYPES[annotation]
    except KeyError as err:
        raise TypeError(f"settings field {f.name} has unsupported type {annotation}") from err


SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_TLS_PROTOCOLS = ("SSL", "SASL_SSL")
_SSL_FILES = ("ssl_cafile", "ssl_certfile", "ssl_keyfile")


def _both(name: str) -> str:
    """How a user sets a field: its flag or its variable."""
    return f"{_flag(name)} / {env_name(name)}"


def _check_readable(name: str, path: str) -> None:
    """Refuse a file setting whose file is missing or cannot be opened (nothing is read)."""
    try:
        open(path, "rb").close()  # opened only to learn that it can be
    except FileNotFoundError as err:
        raise ConfigError(f"{env_name(name)}={path}: no such file; set {_both(name)} to an existing PEM file "
                          "(relative paths start at the working directory)") from err
    except OSError as err:
        raise ConfigError(f"{env_name(name)}={path} cannot be read ({err.strerror or err}); set {_both(name)} "
                          "to a PEM file this user can read") from err


@dataclass(frozen=True, repr=False)
class KafkaSettings(SettingsBase):
    """Broker address, topics and client options used by every component."""

    bootstrap_servers: str = setting("localhost:9092", "Kafka bootstrap servers, comma separated")
    input_topic: str = setting("transactions", "topic the producer writes and the worker reads")
    alerts_topic: str = setting("fraud-alerts", "topic the worker publishes alerts to")
    dead_letter_topic: str = setting("transactions-dlq", "topic for records that cannot be scored")
    features_topic: str | None = setting(None, "if set, the worker also publishes every scored record with its "
                                         "features and score here (audit, retraining on streamed features)")
    labels_topic: str = setting("fraud-labels", "topic of fraud labels (chargebacks) keyed by terminal: "
                                "the terminal-risk features of raw input learn from it")
    client_id: str = setting("fraud-pipeline", "Kafka client id prefix")
    security_protocol: str = setting(
        "PLAINTEXT", "Kafka security protocol",
        choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    )
    ssl_cafile: str | None = setting(None, "CA certificate(s), PEM, that signed the broker's certificate "
                                           "(SSL, SASL_SSL); default: the system's CAs")
    ssl_certfile: str | None = setting(None, "client certificate, PEM, for brokers that require one (mTLS); "
                                             "needs --ssl-keyfile")
    ssl_keyfile: str | None = setting(None, "private key, PEM, of --ssl-certfile (may be the same file)")
    ssl_password: str | None = setting(None, "password of an encrypted --ssl-keyfile", secret=True)
    ssl_check_hostname: bool = setting(True, "refuse a broker certificate that does not name the host "
                                             "connected to (its SAN); the CA is checked either way")
    sasl_mechanism: str | None = setting(None, f"SASL mechanism: {', '.join(SASL_MECHANISMS)}")
    sasl_username: str | None = setting(None, "SASL user name")
    sasl_password: str | None = setting(None, "SASL password", secret=True)
    replication_factor: int = setting(0, "replicas of each topic the worker creates (alerts, dead letters, "
                                      "features, labels, raw input's changelogs and repartition); 0: the "
                                      "broker's default.replication.factor. The worker refuses to start (exit 2) "
                                      "when one of those topics exists with fewer")
    request_timeout_ms: int = setting(30000, "Kafka request timeout in milliseconds")
    connect_timeout_s: float = setting(30.0, "how long to keep trying to reach a bootstrap server at start")

    def __post_init__(self) -> None:
        for f in fields(self):  # an empty variable (compose passes unset ones as "") means: not set
            if f.type == "str | None" and getattr(self, f.name) == "":
                object.__setattr__(self, f.name, None)

    @property
    def uses_tls(self) -> bool:
        """Whether connections are TLS (SSL or SASL_SSL)."""
        return self.security_protocol in _TLS_PROTOCOLS

    def validate(self) -> None:
        check_bootstrap(self.bootstrap_servers)
        topics = [self.input_topic, self.alerts_topic, self.dead_letter_topic, self.labels_topic,
                  *([self.features_topic] if self.features_topic else [])]
        if len(set(topics)) != len(topics):
            raise ConfigError(f"input, alerts, dead-letter, labels and features topics must differ, got {topics}")
        self._validate_tls()
        self._validate_sasl()
        if not 0 <= self.replication_factor <= 32767:
            raise ConfigError(f"replication_factor={self.replication_factor} must be between 1 and 32767, or 0 for "
                              "the broker's default")
        if not 0 < self.request_timeout_ms <= 2_147_483_647:
            raise ConfigError(f"request_timeout_ms={self.request_timeout_ms} must be between 1 and 2147483647")
        if self.connect_timeout_s < 0:
            raise ConfigError(f"connect_timeout_s={self.connect_timeout_s} must be >= 0")

    def _validate_tls(self) -> None:
        given = [name for name in (*_SSL_FILES, "ssl_password") if getattr(self, name)]
        if given and not self.uses_tls:
            raise ConfigError(f"{env_name(given[0])} is set but {env_name('security_protocol')}="
                              f"{self.security_protocol} does not use TLS; set {_both('security_protocol')} "
                              f"to SSL or SASL_SSL, or unset {env_name(given[0])}")
        if self.ssl_certfile and not self.ssl_keyfile:
            raise ConfigError(f"{env_name('ssl_certfile')} is set without {env_name('ssl_keyfile')}; set "
                              f"{_both('ssl_keyfile')} to the certificate's private key (the same file when it "
                              "holds both)")
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ConfigError(f"{env_name('ssl_keyfile')} is set without {env_name('ssl_certfile')}; set "
                              f"{_both('ssl_certfile')} to the client certificate that goes with the key")
        if self.ssl_password and not self.ssl_keyfile:
            raise ConfigError(f"{env_name('ssl_password')} is set without {env_name('ssl_keyfile')}; it is the "
                              f"password of an encrypted key: set {_both('ssl_keyfile')} or unset it")
        for name in _SSL_FILES:
            path = getattr(self, name)
            if path:
                _check_readable(name, path)

    def _validate_sasl(self) -> None:
        sasl = self.security_protocol.startswith("SASL")
        given = [name for name in ("sasl_mechanism", "sasl_username", "sasl_password") if getattr(self, name)]
        if given and not sasl:
            raise ConfigError(f"{env_name(given[0])} is set but {env_name('security_protocol')}="
                              f"{self.security_protocol} does not use SASL; set {_both('security_protocol')} "
                              f"to SASL_SSL or SASL_PLAINTEXT, or unset {env_name(given[0])}")
        if not sasl:
            return
        if not self.sasl_mechanism:
            raise ConfigError(f"security_protocol={self.security_protocol} needs --sasl-mechanism / "
                              f"{env_name('sasl_mechanism')}: one of {', '.join(SASL_MECHANISMS)}")
        if self.sasl_mechanism not in SASL_MECHANISMS:
            raise ConfigError(f"{env_name('sasl_mechanism')}={self.sasl_mechanism} is not supported; set "
                              f"{_both('sasl_mechanism')} to one of {', '.join(SASL_MECHANISMS)}")
        missing = [name for name in ("sasl_username", "sasl_password") if not getattr(self, name)]
        if missing:
            raise ConfigError(f"{self.sasl_mechanism} needs a user name and a password; set "
                              f"{' and '.join(_both(name) for name in missing)}")

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments common to kafka-python's producer, consumer and admin client."""
        options: dict[str, Any] = {
            "bootstrap_servers": [s.strip() for s in self.bootstrap_servers.split(",")],
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.uses_tls:
            options["ssl_check_hostname"] = self.ssl_check_hostname
            options.update({name: getattr(self, name) for name in (*_SSL_FILES, "ssl_password")
                            if getattr(self, name)})
        if self.sasl_mechanism:
            options.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        return options


_ADDRESS = re.compile(r"(\[[^\[\]\s/]+\]|[^\[\]\s/:,]+):([0-9]+)")  # host:port or [IPv6]:port, ASCII digits


def check_bootstrap(servers: str) -> None:
    """Refuse a bootstrap list at start, before any connection is tried: each entry host:port or [IPv6]:port,
    the port from 1 to 65535. The one check of every command (all build :class:`KafkaSettings`).

    >>> check_bootstrap("kafka:9092, [::1]:9093")
    >>> check_bootstrap("kafka:90x2")
    Traceback (most recent call last):
    ...
    pipeline.errors.ConfigError: bootstrap server 'kafka:90x2' is not host:port (IPv6: [address]:port); set \
--bootstrap-servers or FRAUD_BOOTSTRAP_SERVERS to host:port[,host:port...]
    """
    fix = f"set --bootstrap-servers or {env_name('bootstrap_servers')} to host:port[,host:port...]"
    if not servers.strip():
        raise ConfigError(f"bootstrap_servers is empty; {fix}")
    for entry in (server.strip() for server in servers.split(",")):
        address = _ADDRESS.fullmatch(entry)
        if address is None:
            raise ConfigError(f"bootstrap server {entry!r} is not host:port (IPv6: [address]:port); {fix}")
        if not 1 <= int(address[2]) <= 65535:
            raise ConfigError(f"bootstrap server {entry!r}: the port must be a number from 1 to 65535; {fix}")


def check_device(device: str) -> None:
    """Refuse a device name torch would not understand, before anything is loaded."""
    if not (device in {"auto", "cpu", "cuda"} or device.startswith("cuda:")):
        raise ConfigError(f"device={device!r}: use auto, cpu, cuda or cuda:N")


@dataclass(frozen=True, repr=False)
class WorkerSettings(SettingsBase):
    """The streaming worker's own settings (Kafka ones live in KafkaSettings)."""

    model_dir: str = setting("models", "model root (with a `current` link) or one model version folder")
    consumer_group: str = setting("fraud-worker", "Kafka consumer group shared by all workers")
    max_batch: int = setting(4096, "close a micro-batch at this many records")
    # 10 ms halves latency on featured input (alerts' p99 at 10k tx/s 283 -> 171 ms here). make demo's raw-input
    # run once counted 24,810 late events at 10 ms: batches were aligned by pacing luck, not by event time; since
    # watermark alignment (pipeline.worker.state.eventtime) the window changes no feature (tested at 5, 50, 500)
    max_wait_ms: int = setting(50, "close a micro-batch this long after its first record")
    device: str = setting("auto", "scoring device: auto (CUDA when present), cpu, cuda, cuda:N")
    torch_threads: int = setting(0, "PyTorch threads for CPU scoring; 0: one per CPU but one, which "
                                    "the decode loop and Kafka's IO thread need")
    metrics_host: str = setting("0.0.0.0", "address of the Prometheus /metrics endpoint")  # noqa: S104
    metrics_port: int = setting(9108, "port of the Prometheus /metrics endpoint; 0 disables it")
    top_features: int = setting(3, "contributing features listed on each alert")
    max_record_bytes: int = setting(64 * 1024, "larger input records are dead-lettered as oversized")
    reload_interval_s: float = setting(5.0, "how often to look for a new model version; 0 disables")
    auto_offset_reset: str = setting("earliest", "where a new consumer group starts",
                                     choices=("earliest", "latest"))
    max_retry_backoff_s: float = setting(5.0, "longest pause between retries while Kafka is down")
    processing_guarantee: str = setting(
        "at-least-once", "at-least-once: outputs acknowledged, then offsets committed (a crash may repeat "
        "outputs); exactly-once: outputs and offsets in one Kafka transaction (readers with "
        "isolation.level=read_committed see each output once)", choices=("at-least-once", "exactly-once"))
    transaction_timeout_ms: int = setting(10_000, "exactly-once: the broker aborts a transaction left open "
                                                   "this long (a crashed worker's), so readers move on")
    max_in_flight: int = setting(4, "at-least-once: batches whose outputs may still await "
                                    "acknowledgement while the next are read and scored (committed in order); "
                                    "1 waits for each batch's acknowledgements before reading on")
    stall_timeout_s: float = setting(30.0, "a worker with no partition this long, while some input partition "
                                           "has no owner in the group, joins again; 0 disables")
    max_event_ahead_days: float = setting(
        7.0, "raw input: an event time this far ahead of its input partition's stream time is dead-lettered as "
        "bad_time (one record dated 2100 would otherwise empty its customer's and terminal's windows); 0: no limit")
    label_grace_days: float = setting(
        1.0, "raw input, online quality: a scored transaction whose label has not come this long after the label "
        "delay (in its partition's event time) counts as genuine; more waits for slower labels and counts later; "
        "at most 30 (a fraud label must still be in its terminal's windows)")
    min_amount: float = setting(0.0, "raw input: a smaller TX_AMOUNT is dead-lettered as out_of_range")
    max_amount: float = setting(1e9, "raw input: a larger TX_AMOUNT is dead-lettered as out_of_range (one absurd "
                                     "amount would otherwise poison its customer's mean amounts for 30 days)")
    kafka_client: str = setting(
        "kafka-python", "Kafka client of the group consumer and the output producer: kafka-python, or confluent "
        "(confluent-kafka on librdkafka, faster; pip install 'fraud-pipeline[confluent]'; at-least-once only)",
        choices=("kafka-python", "confluent"))

    def validate(self) -> None:
        if not 1 <= self.max_batch <= 1_000_000:
            raise ConfigError(f"max_batch={self.max_batch} must be between 1 and 1000000")
        if self.max_wait_ms < 0:
            raise ConfigError("max_wait_ms must be >= 0")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port={self.metrics_port} is not a TCP port")
        if self.top_features < 0:
            raise ConfigError("top_features must be >= 0")
        if self.torch_threads < 0:
            raise ConfigError(f"torch_threads={self.torch_threads} must be >= 0 (0: automatic)")
        check_device(self.device)
        if self.reload_interval_s < 0 or self.max_retry_backoff_s <= 0:
            raise ConfigError("reload_interval_s must be >= 0 and max_retry_backoff_s > 0")
        if not 1000 <= self.transaction_timeout_ms <= 900_000:
            raise ConfigError(f"transaction_timeout_ms={self.transaction_timeout_ms} must be between 1000 and "
                              "900000 (the broker's default transaction.max.timeout.ms)")
        if not 1 <= self.max_in_flight <= 64:
            raise ConfigError(f"max_in_flight={self.max_in_flight} must be between 1 and 64")
        if self.stall_timeout_s < 0:
            raise ConfigError(f"stall_timeout_s={self.stall_timeout_s} must be >= 0 (0 disables)")
        if self.max_event_ahead_days < 0:
            raise ConfigError(f"max_event_ahead_days={self.max_event_ahead_days} must be >= 0 (0: no limit)")
        if not 0 < self.label_grace_days <= 30:
            raise ConfigError(f"label_grace_days={self.label_grace_days} must be above 0 and at most 30 (a fraud "
                              "label older than the label delay plus 30 days may have left its terminal's windows)")
        if not self.min_amount <= self.max_amount:
            raise ConfigError(f"min_amount={self.min_amount} must be <= max_amount={self.max_amount}")
        if self.kafka_client == "confluent":
            self._check_confluent()

    def _check_confluent(self) -> None:
        if self.processing_guarantee == "exactly-once":
            raise ConfigError("kafka_client=confluent runs at-least-once only for now; use kafka_client=kafka-python "
                              "for processing_guarantee=exactly-once")
        try:
            found = importlib.util.find_spec("confluent_kafka") is not None
        except (ImportError, ValueError):  # blocked or half-installed
            found = False
        if not found:
            raise ConfigError("kafka_client=confluent needs the confluent-kafka package: "
                              "pip install 'fraud-pipeline[confluent]'")


@dataclass(frozen=True, repr=False)
class TrainerSettings(SettingsBase):
    """What ``fraud-train`` shares with the worker: where models live and where to compute."""

    model_dir: str = setting("models", "model root: `fit` adds a version here, `evaluate` and `score` "
                                       "read its `current` (the worker's FRAUD_MODEL_DIR)")
    device: str = setting("auto", "training and scoring device: auto (CUDA when present), cpu, cuda, cuda:N")

    def validate(self) -> None:
        check_device(self.device)
