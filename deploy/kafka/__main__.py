"""``python -m deploy.kafka start|stop|status``: manage the local broker (or ``--brokers 3``: a cluster), from any
directory.

The broker's files live in the checkout's ``.cache/kafka`` whatever the working directory (``--home`` to move them).
"""

from __future__ import annotations

import argparse
import logging
import sys

from deploy.kafka.cluster import LocalCluster
from deploy.kafka.local import DEFAULT_HOME, BrokerState, LocalKafka, LocalKafkaError
from pipeline.cliargs import print_error

PROG = "python -m deploy.kafka"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument("--home", default=str(DEFAULT_HOME), help="cache and state folder")
    parser.add_argument("--port", type=int, default=None, help="broker port (default: a free one)")
    parser.add_argument("--brokers", type=int, default=1,
                        help="start: 1 (a single combined node, the default) or 3 or more: a KRaft cluster of combined "
                             "nodes with replication factor 3 and min.insync.replicas=2")
    parser.add_argument("--tls", action="store_true",
                        help="start: add TLS, mTLS and SASL_SSL (SCRAM-SHA-512/256, PLAIN) listeners with a "
                             "throw-away CA, and print the FRAUD_* settings for each")
    return parser


def print_secure_listeners(state: BrokerState) -> None:
    """The settings that reach each secure listener, as shell lines."""
    tls = f"FRAUD_SECURITY_PROTOCOL=SSL FRAUD_SSL_CAFILE={state.ca_file}"
    print(f"# TLS:  FRAUD_BOOTSTRAP_SERVERS={state.ssl_servers} {tls}")
    print(f"# mTLS: FRAUD_BOOTSTRAP_SERVERS={state.mtls_servers} {tls} FRAUD_SSL_CERTFILE={state.client_cert_file} "
          f"FRAUD_SSL_KEYFILE={state.client_key_file} FRAUD_SSL_PASSWORD={state.client_key_password}")
    print(f"# SASL: FRAUD_BOOTSTRAP_SERVERS={state.sasl_ssl_servers} FRAUD_SECURITY_PROTOCOL=SASL_SSL "
          f"FRAUD_SSL_CAFILE={state.ca_file} FRAUD_SASL_MECHANISM=SCRAM-SHA-512 "
          f"FRAUD_SASL_USERNAME={state.sasl_username} FRAUD_SASL_PASSWORD={state.sasl_password}")
    print(f"# a certificate for another host name (FRAUD_SSL_CHECK_HOSTNAME=false reaches it): "
          f"{state.wrong_host_servers}")


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # kafka-python's INFO chatter; the readiness probe is quiet
    if args.brokers != 1 and args.brokers < 3:
        print_error(PROG, f"--brokers must be 1, or 3 or more (replication factor 3), not {args.brokers}")
        return 2
    if args.brokers > 1 and (args.tls or args.port):
        print_error(PROG, "--tls and --port are for the single broker, not a cluster")
        return 2
    kafka = LocalKafka(args.home)
    cluster = LocalCluster(args.home, nodes=max(3, args.brokers))
    try:
        if args.command == "start" and args.brokers > 1:
            nodes = cluster.start()
            for node in nodes.nodes:
                print(f"node {node.node_id} at {node.bootstrap_servers} (pid {node.pid}, log {node.log_file})")
            print(f"export FRAUD_BOOTSTRAP_SERVERS={nodes.bootstrap_servers}")
        elif args.command == "start":
            state = kafka.start(port=args.port, tls=args.tls)
            print(f"Kafka running at {state.bootstrap_servers} (pid {state.pid}, log {state.log_file})")
            print(f"export FRAUD_BOOTSTRAP_SERVERS={state.bootstrap_servers}")
            if state.ssl_servers:
                print_secure_listeners(state)
        elif args.command == "stop":
            single, nodes_stopped = kafka.stop(), cluster.stop()
            print("Kafka stopped" if single or nodes_stopped else "no local Kafka was running")
        else:
            state, nodes = kafka.state(), cluster.state()
            if state:
                print(f"running at {state.bootstrap_servers} (pid {state.pid})")
            if nodes:
                print(f"cluster running at {nodes.bootstrap_servers} (nodes alive: "
                      f"{', '.join(str(n.node_id) for n in nodes.nodes if cluster.alive(n.node_id)) or 'none'})")
            if not state and not nodes:
                print("not running")
            return 0 if state or nodes else 1
    except LocalKafkaError as err:
        print_error(PROG, str(err))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run())
