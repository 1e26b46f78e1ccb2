# Shared by tools/device/device_check.sh and tools/device/device_broker.sh (sourced, not run).

# machine_report OUT PY: the machine, PyTorch and its GPUs, and nvidia-smi (also into OUT/nvidia-smi.txt);
# starts sampling GPU use every 0.5 s into OUT/gpu_samples.csv and leaves the sampler's pid in $sampler
# (empty where there is no nvidia-smi): the caller stops it.
machine_report() {
  local out=$1 py=$2
  echo "== machine $(date -u +%FT%TZ)"
  uname -srm
  echo "cpus: $(nproc)"
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available',
torch.cuda.is_available(), *(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))"
  sampler=
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi | tee "$out/nvidia-smi.txt"
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw --format=csv -lms 500 \
      >"$out/gpu_samples.csv" &
    sampler=$!
  else
    echo "no nvidia-smi here"
  fi
}
