#!/usr/bin/env bash
# The prepared GPU check of the distributed engines, separate from check.sh (which takes most of one device
# command): run on a lent GPU machine through the device tool, from the repository root, with `.whl` carried
# (made by benchmarks/gpu/fetch_wheels.sh):
#     bash benchmarks/gpu/check_distributed.sh     # about 2 minutes on one GPU; results under $OUT
# tests/distributed/test_gpu_engines.py under NCCL, bf16-mixed: torchrun with 1 process under fsdp2 and
# fsdp2-offload against the plain single-process run; with 2 GPUs or more, 2-process DDP and FSDP2 too.
# $OUT/gpu_engines.txt holds pytest's whole output, ending with every test as PASSED, FAILED or SKIPPED (with the
# reason); gpu_engines.xml the same as JUnit XML.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check-distributed}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/tests PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version(), 'gpus', torch.cuda.device_count(), torch.cuda.get_device_name())" \
    | tee "$OUT/versions.txt"
timeout 170 python3 -m pytest -p no:cacheprovider -rA -v --durations=0 --junitxml="$OUT/gpu_engines.xml" \
    tests/distributed/test_gpu_engines.py > "$OUT/gpu_engines.txt" 2>&1
status=$?
tail -60 "$OUT/gpu_engines.txt"
echo "pytest exit status $status (124: timed out); done: results in $OUT" | tee -a "$OUT/gpu_engines.txt"
exit "$status"
