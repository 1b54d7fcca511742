#!/usr/bin/env bash
# One prepared check for a machine with a CUDA GPU (Python with torch + onnxruntime installed,
# no internet). Installs this package without dependencies, runs the `gpu`-marked tests, then
# the GPU training / inference benchmark, then our engine against airbench on its own network
# (benchmarks/vs_airbench.py), then (2+ GPUs) the data-parallel train stage under torchrun with
# one process per GPU (benchmarks/ddp_check.py). Each step has its own timeout (a step that runs
# out is cut, the next one runs): on one GPU at most 170 + 200 + 150 s, inside the device tool's
# 10-minute command limit. From the device tool, with `make device-wheels` run here first:
#   run(carry=[".whl"], timeout_s=600,
#       command="set -o pipefail; bash benchmarks/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log")
#   bash benchmarks/gpu_check.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# Wheels carried in .whl/ (optuna and its SQL layer) for the search test, see README; airbench
# for vs_airbench.py (`make device-wheels`).
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
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/gpu -m gpu -o addopts="" 2>&1 | tail -15
tests_rc=${PIPESTATUS[0]}
echo "== gpu benchmark"
timeout 200 python3 benchmarks/gpu_train.py "$@"
bench_rc=$?
echo "== vs airbench"
timeout 150 python3 benchmarks/vs_airbench.py "$@"
airbench_rc=$?
echo "== ddp train (torchrun, NCCL, one process per visible GPU)"
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
ddp_rc=0
if [ "${gpus:-0}" -ge 2 ]; then
  timeout 150 python3 benchmarks/ddp_check.py --device cuda --nproc "$gpus"
  ddp_rc=$?
else  # NCCL refuses two ranks on one GPU; the CPU (gloo) path is tests/e2e/test_ddp.py
  echo "ddp: skipped, $gpus visible GPU(s); needs 2 or more"
fi
echo "gpu tests rc=$tests_rc benchmark rc=$bench_rc airbench rc=$airbench_rc ddp rc=$ddp_rc"
exit $(( tests_rc != 0 || bench_rc != 0 || airbench_rc != 0 || ddp_rc != 0 ))
