#!/usr/bin/env bash
# The CUDA figures of issue 10 item 5 in one run, for a lent GPU machine (no network, no broker):
# the machine, then bench/gpu_scoring.py (scoring tx/s and device memory by batch size, end to end
# and device-only) and bench/gpu_worker_path.py (the worker's decode -> score -> explain -> encode
# path without Kafka, CPU vs CUDA). Writes under $OUT: device_check.log, gpu_scoring.json,
# gpu_worker_path.json, nvidia-smi.txt, gpu_samples.csv (GPU use every 0.5 s). Where the trainer's
# dependencies are present it also runs tests/unit/test_scoring.py (CUDA against CPU included).
#
#   OUT=/tmp/out tools/device/device_check.sh        # GPU machine: about 3 minutes (16 cores, H100/H200)
#   SMOKE=1 OUT=/tmp/out tools/device/device_check.sh   # anywhere, CPU only: tiny sizes, about a minute
#
# Models: $MODELS (default runs/device-check/models), trained first where missing, which needs the
# trainer's dependencies (matplotlib, tqdm, scikit-learn): prepare the folder on a development
# machine (`tools/device/device_check.sh --prepare`) and carry it. orjson and safetensors, when the
# machine's Python lacks them, are installed offline from wheels in .whl/ into a private folder.
# Python: $PYTHON, else python3.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
MODELS=${MODELS:-runs/device-check/models}

if [ "${1:-}" = "--prepare" ]; then
  exec "$PY" -c "import sys; sys.path.insert(0, '.'); from pathlib import Path; from bench.devicekit import \
prepare_models; print(prepare_models(Path(sys.argv[1])))" "$MODELS"
fi

OUT=${OUT:-runs/device-check/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1

if [ -n "${SMOKE:-}" ]; then
  scoring=(--sizes 256,4096 --min-seconds 0.05)
  worker=(--records 3000 --batches 1024,4096)
else
  scoring=(--sizes 256,1024,4096,16384,65536,262144,524288 --min-seconds 0.5)
  worker=(--records 200000 --batches 4096,16384,65536)
fi

# shellcheck source=tools/device/devicelib.sh
source tools/device/devicelib.sh
machine_report "$OUT" "$PY"
[ -n "$sampler" ] && trap 'kill "$sampler"' EXIT

missing=$("$PY" -c "import importlib.util as u; print(*[m for m in ('orjson', 'safetensors') if not u.find_spec(m)])")
if [ -n "$missing" ]; then
  site=$(mktemp -d)
  echo "== installing $missing from .whl/ into $site"
  if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install --quiet --no-index --no-deps --find-links .whl --target "$site" $missing
  else  # a wheel is a zip of the installed files
    for m in $missing; do for w in .whl/"$m"-*.whl; do "$PY" -m zipfile -e "$w" "$site"; done; done
  fi
  PYTHONPATH="$site" "$PY" -c "import ${missing// /, }" \
    || { echo "put wheels of $missing for $("$PY" -V) on $(uname -m) in .whl/"; exit 2; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

status=0
echo "== scoring alone"
timeout 120 "$PY" bench/gpu_scoring.py --models "$MODELS" "${scoring[@]}" --json "$OUT/gpu_scoring.json" \
  || { echo "gpu_scoring.py failed ($?)"; status=1; }
echo "== worker path without Kafka"
timeout 150 "$PY" bench/gpu_worker_path.py --models "$MODELS" "${worker[@]}" --json "$OUT/gpu_worker_path.json" \
  || { echo "gpu_worker_path.py failed ($?)"; status=1; }
if "$PY" -c "import pytest, sklearn, matplotlib, tqdm" 2>/dev/null; then  # the trainer can run: the CUDA tests too
  echo "== tests/unit/test_scoring.py"
  timeout 60 "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_scoring.py || status=1
fi
echo "== done $(date -u +%FT%TZ), status $status"
exit $status
