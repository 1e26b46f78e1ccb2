#!/usr/bin/env bash
# Installs PyTorch into a virtual environment before the project, so the project's `torch>=2.4`
# is already met by the build chosen here. Usage: deploy/install-torch.sh VENV/bin/python
#   TORCH=cpu   PyTorch's CPU wheels from TORCH_CPU_INDEX (~200 MB). If that index cannot be
#               reached, PyPI's wheel instead, with a warning (on Linux x86-64: the CUDA build).
#   TORCH=cuda  PyPI's default wheel: on Linux x86-64 the CUDA build (several GB; it brings its own
#               CUDA runtime, only the NVIDIA driver is needed).
# A build already installed is kept when it is the one asked for; another is replaced (for a
# clean switch, without the other build's leftovers: rm -rf .venv first).
set -euo pipefail
python=$1
uv="$(dirname "$python")/uv"
want=${TORCH:-cpu}
index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
have=$("$python" -c 'import torch; print("cuda" if torch.version.cuda else "cpu")' 2>/dev/null || true)

install() {  # WHERE FROM, then uv's arguments for it
  echo "install-torch: installing PyTorch from $1 (TORCH=$want)" >&2
  shift
  "$uv" pip install -q --python "$python" ${have:+--reinstall-package torch} "$@" torch
}

case $want in
  cpu)
    [ "$have" = cpu ] && exit 0
    if "$python" - "$index" <<'EOF'; then
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=10).close()
except OSError:
    sys.exit(1)
EOF
      install "$index" --extra-index-url "$index"   # uv searches the extra index first
      exit 0
    fi
    echo "install-torch: $index cannot be reached from this machine: using PyPI's torch instead" \
         "(on Linux x86-64 the CUDA build, several GB). TORCH=cuda says so explicitly;" \
         "TORCH_CPU_INDEX=URL names a mirror of the CPU index." >&2
    [ -n "$have" ] && exit 0
    install PyPI
    ;;
  cuda)
    [ "$have" = cuda ] && exit 0
    install PyPI
    ;;
  *)
    echo "install-torch: TORCH=$want: expected cpu or cuda" >&2
    exit 2
    ;;
esac
