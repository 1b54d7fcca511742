#!/usr/bin/env bash
# One prepared check for a machine with a CUDA GPU (Python with torch + onnxruntime installed,
# no internet). Installs this package without dependencies, runs the `gpu`-marked tests, then
# the GPU training / inference benchmark. Keep it under 8 minutes.
#   bash benchmarks/gpu_check.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# Wheels carried in .whl/ (optuna and its SQL layer) for the search test; see README.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 \
  || export PYTHONPATH="$PWD:${PYTHONPATH:-}"
python3 - <<'PY'
import torch, onnxruntime as ort
print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
print("onnxruntime", ort.__version__, ort.get_available_providers())
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "== gpu tests"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu -m gpu -o addopts="" 2>&1 | tail -15
tests_rc=${PIPESTATUS[0]}
echo "== gpu benchmark"
timeout 300 python3 benchmarks/gpu_train.py "$@"
bench_rc=$?
echo "gpu tests rc=$tests_rc benchmark rc=$bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
