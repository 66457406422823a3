#!/usr/bin/env bash
# The GPU check's first step (benchmarks/gpu_check.sh): install the carried wheels into a venv
# that sees the image's packages (its CUDA torch stays), then import everything the check
# uses and print versions and the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${GPU_CHECK_PYTHON:-python3}
if [ -d gpu/wheels ] && [ -z "${GPU_CHECK_NO_INSTALL:-}" ]; then
    "$py" -m venv --system-site-packages /tmp/gpu-check-venv || exit 1
    py=/tmp/gpu-check-venv/bin/python
    "$py" -m pip install -q --no-index --find-links gpu/wheels -r gpu/requirements.txt || exit 1
fi
"$py" - <<'PY'
import importlib
import sys

import torch

sys.path.insert(0, "benchmarks")  # peftlab_bench, the benchmark the check runs

for name in ("transformers", "peft", "pydantic", "typer", "rich", "pandas", "rouge_score",
             "pysbd", "safetensors", "tokenizers", "yaml", "numpy", "peftlab.run",
             "peftlab.study", "peftlab_bench.runner"):
    module = importlib.import_module(name)
    print(name, getattr(module, "__version__", ""))
print("torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print("gpu", props.name, f"{props.total_memory / 2**30:.0f} GiB", "bf16",
          torch.cuda.is_bf16_supported())
PY
