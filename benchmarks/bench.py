"""The developer benchmark: peftlab's speed measured side by side with the pipeline a user
would write from the Hugging Face docs, each measurement in its own process.

    PEFTLAB_DATA_DIR=../shared/data .venv/bin/python benchmarks/bench.py --sections train \
        --methods lora --shapes sst2 --out /tmp/bench

`--help` lists the options; the sections and what each measures:
`benchmarks/peftlab_bench/__init__.py`.
"""

from peftlab_bench.cli import app

if __name__ == "__main__":
    app()
