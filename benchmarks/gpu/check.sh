#!/usr/bin/env bash
# The one prepared GPU check (issue 9), run on a lent GPU machine through the device tool, from the repository
# root, with `.whl` carried (made by benchmarks/gpu/fetch_wheels.sh):
#     bash benchmarks/gpu/check.sh            # about 6 minutes on an H200; results under $OUT
# 1. the CUDA-only tests (compiled FlexAttention gradients, bf16-mixed auto, CUDA RNG in checkpoints, ...);
# 2. benchmarks/vs_trl.py on the 1.1B config, full fine-tuning, bf16-mixed, against TRL's GPU defaults;
# 3. LoRA r16 on the same model, 8 steps, against TRL's LoRA.
# Each part has its own timeout, so that the whole stays under the device tool's 10 minutes per command.
# The distributed engines under NCCL (FSDP2, its offload, DDP) have their own, shorter command: check_distributed.sh.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/tests PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider -k "cuda or CUDA or gpu" \
    tests/packing tests/train tests/test_reference_fingerprint.py 2>&1 | tail -30 | tee "$OUT/pytest_cuda.txt"
common=(--device cuda --model 1b --precision bf16-mixed --batch 32 --micro-batch 8 --max-length 1024)
timeout 330 python3 benchmarks/vs_trl.py "${common[@]}" --steps 16 \
    --systems dpokit,trl,trl_precompute,trl_no_checkpointing --json "$OUT/bench_1b_full.json" 2>&1 \
    | tail -40 | tee "$OUT/bench_1b_full.txt"
timeout 150 python3 benchmarks/vs_trl.py "${common[@]}" --steps 8 --lora \
    --systems dpokit,trl --json "$OUT/bench_1b_lora.json" 2>&1 | tail -40 | tee "$OUT/bench_1b_lora.txt"
echo "done: results in $OUT"
