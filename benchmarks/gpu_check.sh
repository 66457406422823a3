#!/usr/bin/env bash
# The GPU check: runs on a bare device machine (its image: Python 3.12, a CUDA torch,
# transformers) from a copy of this working tree with gpu/ carried (scripts/gpu_wheels.sh
# fills it here: wheels of what the image lacks, and the data). Named steps in priority
# order, each under its own time limit; a step that hangs or fails costs only its budget and
# the next one runs. Everything goes to $OUT (default gpu-check-out): one log per step, and
# steps.tsv with each step's exit code and seconds. 9 minutes at most.
#   bash benchmarks/gpu_check.sh                  # on the device (the device call's command)
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_SMALL=1 GPU_CHECK_NO_INSTALL=1 \
#       GPU_CHECK_PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh   # rehearsal on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
device=${GPU_CHECK_DEVICE:-cuda}
export PEFTLAB_DATA_DIR=${PEFTLAB_DATA_DIR:-$PWD/gpu/data} HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/src
if [ -n "${GPU_CHECK_SMALL:-}" ]; then  # a CPU rehearsal: the tiny preset, few members
    model=t5-tiny members=3 steps=2 big=4 subset=8 examples=8
else
    model=flan-t5-small-random members=27 steps=4 big=8 subset=32 examples=64
fi
py=${GPU_CHECK_PYTHON:-python3}
printf 'step\texit\tseconds\n' > "$OUT/steps.tsv"

step() {  # step NAME SECONDS COMMAND...: run it under its limit, log output and exit code
    local name=$1 limit=$2 began=$SECONDS
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local code=$?
    printf '%s\t%s\t%s\n' "$name" "$code" "$((SECONDS - began))" >> "$OUT/steps.tsv"
    tail -n 30 "$OUT/$name.log"
    echo "== $name: exit $code in $((SECONDS - began)) s"
    return 0
}

step preflight 60 env GPU_CHECK_PYTHON="$py" bash benchmarks/gpu_preflight.sh
if [ -x /tmp/gpu-check-venv/bin/python ]; then py=/tmp/gpu-check-venv/bin/python; fi
step correctness 75 "$py" benchmarks/gpu_correctness.py --device "$device" --model "$model" \
    --out "$OUT"
bf16=$([ "$device" = cuda ] && echo --bf16)
step pack-steps-sst2 75 "$py" benchmarks/pack_step.py --device "$device" $bf16 \
    --model "$model" --task sst2 --members "1,$big,$members" --steps "$steps" \
    --methods lora,prompt,prefix,ia3,ln
step pack-steps-samsum 60 "$py" benchmarks/pack_step.py --device "$device" $bf16 \
    --model "$model" --task samsum --members "1,$big,$members" --steps "$steps" \
    --methods lora,prefix
step whole-runs 60 "$py" benchmarks/bench.py --out "$OUT/bench" --model "$model" \
    --precision bf16 --sections matmul,pack --shapes sst2 --methods lora \
    --pack-sizes "$big" --pack-runs "$big" --runs-per-gpu "$big" --pack-study ''
step eval-together 45 "$py" benchmarks/eval_together.py --device "$device" --model "$model" \
    --members "$big" --examples "$examples"
step full-vmap 45 "$py" benchmarks/full_pack_step.py --device "$device" $bf16 \
    --model "$model" --members "1,$big" --steps "$steps"
step projection 80 "$py" benchmarks/gpu_projection.py --device "$device" --model "$model" \
    --members "$members" --steps "$steps" --subset "$subset" --out "$OUT"
step eval-precision 40 "$py" benchmarks/eval_precision.py --model "$model" --methods lora \
    --steps "$((steps * 10))" --out "$OUT"
cat "$OUT/steps.tsv"
