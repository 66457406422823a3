#!/usr/bin/env bash
# The GPU figures (benchmarks/results/gpu/): one script, sections in order of importance, so
# that a run cut short by a time limit still leaves the first ones in OUT/bench.{json,md}.
# usage (peftlab importable: pip install -e . or PYTHONPATH=src):
#   PEFTLAB_DATA_DIR=../shared/data bash benchmarks/gpu.sh [OUT]
set -uo pipefail
out=${1:-benchmarks/results/gpu}
bench() { python3 benchmarks/bench.py --out "$out" --model "${BENCH_MODEL:-flan-t5-small-random}" --precision bf16 --steps 30 --warmup 10 "$@"; }
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name(0))" || exit 1
# packed training (issue 16): the same runs alone (one per GPU, and 8 sharing it) and in packs
bench --sections matmul,pack --shapes sst2 --methods lora,prompt,prefix,ia3,ln --pack-sizes 8,16,32 --pack-runs 32 --runs-per-gpu 8 --pack-study smoke
bench --keep --sections pack --shapes samsum --methods lora,prefix --pack-sizes 8,16 --pack-runs 16 --runs-per-gpu 8 --pack-study ''
# full fine-tuning packed with torch.func (vmap over stacked models) against one by one: on
# this CPU 0.37-0.73x (docs/speed.md, "Packs"); packed only if a GPU gains
python3 benchmarks/full_pack_step.py --members 1,8,16 --steps 6 --device cuda --bf16 | tee "$out/full_pack_step.txt"
bench --keep --sections train --shapes sst2
bench --keep --sections grid,cell --shapes sst2
bench --keep --sections train --shapes samsum
bench --keep --sections eval --shapes sst2,samsum
bench --keep --sections cell --shapes samsum  # not measured yet anywhere (too slow on the CPU)
