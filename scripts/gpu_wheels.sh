#!/usr/bin/env bash
# Fill gpu/ (ignored by git) with what the GPU check carries to a device that reaches no
# registry: wheels for its Python (3.12) of the packages its image lacks, at the versions
# this checkout's .venv (and CI) uses, and a copy of the data. Its image has a CUDA torch and
# transformers with their own dependencies (numpy, huggingface_hub, tokenizers, safetensors,
# pyyaml, regex, tqdm, filelock, packaging); the report's scipy and matplotlib and the hub's
# datasets are not needed by the check, so neither is carried (the 64 MiB carry limit).
#   bash scripts/gpu_wheels.sh            # after scripts/setup.sh; data from ../shared/data
set -euo pipefail
cd "$(dirname "$0")/.."
data=${PEFTLAB_DATA_DIR:-../shared/data}
python_version=${GPU_PYTHON:-3.12}
abi="cp${python_version/./}"
rm -rf gpu/wheels gpu/data
mkdir -p gpu/wheels
# the check's packages and their dependencies beyond the image's, pinned as in .venv
needed="peft accelerate psutil pydantic pydantic-core annotated-types typing-inspection
typing-extensions typer click rich markdown-it-py mdurl pygments shellingham pandas
python-dateutil six tzdata rouge-score nltk absl-py joblib pysbd sentencepiece"
pins=()
for name in $needed; do
    pin=$(.venv/bin/python -m pip show "$name" 2>/dev/null | awk '/^Version:/{print $2}')
    # not in .venv: no installed package needs it (e.g. pytz under pandas 3)
    [ -n "$pin" ] && pins+=("$name==$pin")
done
printf '%s\n' "${pins[@]}" > gpu/requirements.txt
for pin in "${pins[@]}"; do
    if ! .venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d gpu/wheels \
            --python-version "$python_version" --implementation cp --abi "$abi" \
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux_2_28_x86_64 "$pin" 2>/dev/null; then
        # a source-only package (rouge-score): build its pure-Python wheel here
        .venv/bin/python -m pip wheel -q --no-deps -w gpu/wheels "$pin"
    fi
done
mkdir -p gpu/data
cp -r "$data"/sst2 "$data"/samsum "$data"/flan-t5-small-tokenizer gpu/data/
du -sh gpu/wheels gpu/data
echo "carry: gpu (the device call's carry: [\"gpu\"])"
