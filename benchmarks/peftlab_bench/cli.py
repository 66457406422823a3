"""The command line of `python benchmarks/bench.py` (see there)."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from peftlab_bench.common import SHAPES
from peftlab_bench.runner import SECTIONS, run_benchmark

app = typer.Typer(add_completion=False)
console, err_console = Console(), Console(stderr=True)


@app.command()
def bench(
    out: Annotated[Path, typer.Option(help="folder for bench.json and bench.md")] = Path(
        "benchmarks/results"),
    methods: Annotated[str, typer.Option(help="comma-separated")] = "full,lora,prompt,prefix,ia3",
    shapes: Annotated[str, typer.Option(help="sst2,samsum")] = "sst2,samsum",
    sections: Annotated[str, typer.Option(
        help="matmul,train,mfu,numerics,bf16,bf16_eval,batching,eval,cell,grid,pack")] = (
        "matmul,train,mfu,numerics,bf16,bf16_eval,batching,eval,cell"),
    steps: Annotated[int, typer.Option(min=1, help="timed training steps")] = 10,
    warmup: Annotated[int, typer.Option(min=1, help="untimed steps first")] = 3,
    precision: Annotated[str, typer.Option(help="fp32 or bf16")] = "fp32",
    model: Annotated[str, typer.Option(help="model preset, hub id or folder")] = "flan-t5-small-random",
    curve_steps: Annotated[int, typer.Option(min=10, help="steps of the precision and batching runs")] = 100,
    grid_runs: Annotated[int, typer.Option(min=1, help="grid: runs per worker")] = 2,
    grid_steps: Annotated[int, typer.Option(min=4, help="grid: training steps per run")] = 200,
    runs_per_gpu: Annotated[str, typer.Option(
        help="grid: N values, comma-separated (runs sharing one GPU; on CPU, worker processes "
        "splitting the cores, up to the number of CPUs)")] = "1,2,4,8",
    keep: Annotated[bool, typer.Option(
        help="keep the other sections already in OUT/bench.json (same machine and settings)")] = False,
    repeats: Annotated[int, typer.Option(
        min=1, help="train and cell: measure peftlab and the reference this many times, back to "
        "back, alternating which goes first; report the median ratio and its range")] = 1,
    pack_sizes: Annotated[str, typer.Option(help="pack: P values, comma-separated")] = "4,8,16",
    pack_runs: Annotated[int, typer.Option(
        min=1, help="pack: cells per method and shape (seeds), run unpacked and in packs")] = 16,
    pack_study: Annotated[str, typer.Option(
        help="pack: a built-in study run unpacked and in packs ('' for none)")] = "smoke",
) -> None:
    """Measure speed against the Seq2SeqTrainer + peft pipeline, in one run, side by side."""
    def fail(message: str) -> None:
        err_console.print(f"[bold red]error:[/] {message}")
        raise typer.Exit(2)

    if precision not in ("fp32", "bf16"):
        fail(f"--precision must be fp32 or bf16, got {precision!r}")
    for flag, given, allowed in (("--sections", sections, SECTIONS), ("--shapes", shapes, SHAPES)):
        wrong = [x for x in given.split(",") if x not in allowed]
        if wrong:
            fail(f"{flag}: unknown {', '.join(map(repr, wrong))}; choose from {', '.join(allowed)}")
    try:
        n_values = tuple(int(n) for n in runs_per_gpu.split(","))
    except ValueError:
        fail(f"--runs-per-gpu must be comma-separated integers, got {runs_per_gpu!r}")
    try:
        p_values = tuple(int(n) for n in pack_sizes.split(","))
        if min(p_values) < 2:
            raise ValueError
    except ValueError:
        fail(f"--pack-sizes must be comma-separated integers of at least 2, got {pack_sizes!r}")
    run_benchmark(
        out, methods.split(","), shapes.split(","), steps, warmup, precision, sections.split(","),
        model=model, curve_steps=curve_steps, grid_runs=grid_runs, grid_steps=grid_steps,
        runs_per_gpu=n_values, keep=keep, repeats=repeats, pack_sizes=p_values,
        pack_runs=pack_runs, pack_study=pack_study or None,
        log=lambda m: console.print(m, soft_wrap=True, highlight=False))
    console.print(f"results: {out / 'bench.md'}", soft_wrap=True)
