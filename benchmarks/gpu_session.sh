#!/usr/bin/env bash
# Every GPU check in one prepared run, for a session that is lent a single-GPU machine (about 5-8 minutes on
# an H100/H200). Nothing is installed: the machine's own python3 with torch, tokenizers, safetensors,
# tiktoken and transformers is used, with lmforge from src/ on PYTHONPATH. Results and logs go to $OUT (the
# device tool's return folder) or benchmarks/results/gpu/. Through the device tool:
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=600)
# 1. the 1b preset with FSDP2 in bf16 through lmforge's training loop: tokens/s, MFU, peak memory beside the
#    planner's prediction (benchmarks/gpu_fsdp_1b.py);
# 2. the planner's probe on this GPU: measured against predicted peak memory and step time;
# 3. `lmforge train` end to end on CUDA (the demo's data, llama-160m, bf16, parallel.strategy=auto: the plan
#    refined by a trial step, fused AdamW, MFU from the hardware table, samples through the KV cache);
# 4. generation throughput against transformers' generate on the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 LMFORGE_CACHE=/tmp/lmforge-cache
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, keep going on failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local started=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - started))s"
    [ "$rc" = 0 ] || status=1
}

python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
    | tee "$OUT/env.txt" || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >>"$OUT/env.txt" 2>&1

step fsdp_1b 240 python3 -m torch.distributed.run --standalone --nproc-per-node 1 benchmarks/gpu_fsdp_1b.py --steps 40
cp benchmarks/results/gpu_fsdp_1b.json "$OUT/" 2>/dev/null

step probe_1b 150 python3 -m lmforge.cli plan --model 1b --gpu auto --gpus 1 --seq 2048 \
    --global-batch-tokens 524288 --precision bf16 --probe --probe-steps 4 --json

step train_160m 180 python3 -m lmforge.cli train model.preset=llama-160m train.seq_len=1024 \
    train.global_batch_tokens=65536 train.steps=60 train.precision=bf16 train.eval_every=30 train.log_every=10 \
    train.out_dir=/tmp/lmforge-gpu-run --no-progress
cp /tmp/lmforge-gpu-run/plan.json "$OUT/train_160m_plan.json" 2>/dev/null

step generate 150 python3 benchmarks/generate_throughput.py --device cuda --rounds 3 \
    --out "$OUT/generate_throughput_cuda.json"
exit $status
