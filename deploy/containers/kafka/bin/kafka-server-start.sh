#!/bin/sh
# kafka-server-start.sh server.properties: the broker in the foreground, with a 1 GiB heap unless KAFKA_HEAP_OPTS says.
export KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xmx1G -Xms1G}"
exec "$(dirname "$0")/kafka-run-class.sh" kafka.Kafka "$@"
