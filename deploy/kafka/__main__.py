"""``python -m deploy.kafka start|stop|status``: manage the local single-node broker, from any directory.

The broker's files live in the checkout's ``.cache/kafka`` whatever the working directory (``--home`` to move them).
"""

from __future__ import annotations

import argparse
import logging
import sys

from deploy.kafka.local import DEFAULT_HOME, LocalKafka, LocalKafkaError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy.kafka", description=__doc__)
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument("--home", default=str(DEFAULT_HOME), help="cache and state folder")
    parser.add_argument("--port", type=int, default=None, help="broker port (default: a free one)")
    return parser


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # kafka-python's INFO chatter; the readiness probe is quiet
    kafka = LocalKafka(args.home)
    try:
        if args.command == "start":
            state = kafka.start(port=args.port)
            print(f"Kafka running at {state.bootstrap_servers} (pid {state.pid}, log {state.log_file})")
            print(f"export FRAUD_BOOTSTRAP_SERVERS={state.bootstrap_servers}")
        elif args.command == "stop":
            print("Kafka stopped" if kafka.stop() else "no local Kafka was running")
        else:
            state = kafka.state()
            print(f"running at {state.bootstrap_servers} (pid {state.pid})" if state else "not running")
            return 0 if state else 1
    except LocalKafkaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run())
