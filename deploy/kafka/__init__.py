"""Local single-node Apache Kafka for the demo and the integration tests."""

from deploy.kafka.local import BrokerState, LocalKafka, LocalKafkaError, wait_until_ready

__all__ = ["BrokerState", "LocalKafka", "LocalKafkaError", "wait_until_ready"]
