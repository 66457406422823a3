"""Command line: parse, call, print. Errors in the user's input print one paragraph, exit 2.

Each command imports what it runs inside its function: `peftlab --help` and a mistyped flag
answer in a quarter of a second instead of the 5 s that importing torch and transformers
takes here.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from peftlab.errors import STORAGE_ERRNOS, ConfigError, PeftlabError, describe_os_error

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="peftlab: compare ways of adapting small seq2seq models, honestly.")
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}


RESUMABLE = ("run", "train")  # commands that a second call resumes


def _on_interrupt(ctx: typer.Context) -> None:
    """Ctrl-C ends the command with a sentence and exit code 130 (128 + SIGINT), not
    silently: the finally blocks still run (locks, tracker records), the files written are
    complete (every result file is written atomically)."""
    def interrupted(signum: int, frame: Any) -> None:
        hint = ("; run the same command again to resume" if ctx.invoked_subcommand in RESUMABLE
                else "")
        err_console.print(f"interrupted{hint}", highlight=False, soft_wrap=True)
        raise SystemExit(130)

    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, interrupted)
        ctx.call_on_close(lambda: signal.signal(signal.SIGINT, previous))


@app.callback()
def main(ctx: typer.Context,
         debug: Annotated[bool, typer.Option(help="show tracebacks for errors")] = False) -> None:
    _state["debug"] = debug
    _on_interrupt(ctx)
    log = logging.getLogger("peftlab")  # warnings and progress lines from the library
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def _guarded(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except (PeftlabError, OSError) as e:
        if _state["debug"]:
            raise
        # a storage fault names its file; other OS errors (a refused connection) as they are
        storage = isinstance(e, OSError) and (e.filename or e.errno in STORAGE_ERRNOS)
        message = describe_os_error(e) if storage else str(e)
        err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _config_keys() -> str:
    """Every run setting with its default, for `peftlab train --help`."""
    from peftlab.config import RunConfig

    lines = ["Run settings (`--set KEY=VALUE`, or keys of the --config YAML), with defaults:", ""]
    for name, field in RunConfig.model_fields.items():
        default = field.get_default(call_default_factory=True)
        text = f"{name}: {default!r}" + (f" -- {field.description}" if field.description else "")
        lines.append(text)
    lines += ["", "method_args and task_args: the method's and task's own settings "
              "(`peftlab methods` lists each method's)."]
    return "\n\n".join(lines)


@app.command("train", epilog=_config_keys())
def train_cmd(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="run config YAML")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="key=value override")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace a finished run in output_dir")] = False,
) -> None:
    """Train one run into its output folder."""
    from peftlab.api import train
    from peftlab.config import load_run_config

    def go() -> dict:
        cfg = load_run_config(config, set_ or [])
        return train(cfg, progress=not quiet, overwrite=overwrite).summary

    summary = _guarded(go)
    metric = summary["selection_metric"]
    console.print(
        f"[bold]{summary['status']}[/]: {summary['method']} on {summary['task']}, "
        f"best step {summary['best_step']}, val {metric} {summary['val_metrics'].get(metric):.4g}, "
        f"test {json.dumps({k: round(v, 4) for k, v in summary['test_metrics'].items()})}",
        soft_wrap=True, highlight=False,  # one line: a log reader greps it, a pipe keeps it
    )
    console.print("time: " + ", ".join(f"{phase} {s:.1f} s" for phase, s in summary["time_s"].items()),
                  soft_wrap=True, highlight=False)
    if summary["status"] != "completed":
        raise typer.Exit(1)


@app.command("run")
def run_cmd(
    study_file: Annotated[Path | None, typer.Argument(help="study YAML")] = None,
    preset: Annotated[str | None, typer.Option(help="a built-in study: smoke, seed-study")] = None,
    out: Annotated[Path | None, typer.Option(help="study folder (default studies/NAME)")] = None,
    workers: Annotated[int | None, typer.Option(
        min=1, help="runs in parallel (processes); default: runs-per-gpu per GPU, or on CPU "
        "as many as the CPUs hold at each run's cpu_threads")] = None,
    runs_per_gpu: Annotated[int, typer.Option(min=1, help="runs sharing one GPU")] = 1,
    pack: Annotated[int | None, typer.Option(
        min=1, help="runs trained together on one copy of the base model: cells differing "
        "only in seed, learning rate and train size, of lora, ia3, ln, prompt or prefix; "
        "default: the study file's `pack` (1: every run alone)")] = None,
    backend: Annotated[str, typer.Option(help="local or ray")] = "local",
    address: Annotated[str | None, typer.Option(help="Ray cluster address; none: local")] = None,
    dry_run: Annotated[bool, typer.Option(help="print the grid and its cost, run nothing")] = False,
    calibrate: Annotated[bool, typer.Option(
        help="run the first pack (or run) of each task and method, print the projected time "
        "of the rest, and stop (the runs done are kept)")] = False,
    retry_failed: Annotated[bool, typer.Option(help="run failed runs again")] = False,
    rerun_changed: Annotated[bool, typer.Option(
        help="run again the cells whose finished runs used other settings than the study "
        "file now gives (their old results are deleted)")] = False,
    report: Annotated[bool, typer.Option(help="write the report when the grid is done")] = True,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Run a study: every cell of its grid, skipping finished runs and resuming unfinished ones."""
    from peftlab.api import run_study

    study = _guarded(lambda: run_study(
        study_file, preset=preset, out=out, workers=workers, pack=pack,
        runs_per_gpu=runs_per_gpu, backend=backend, address=address, retry_failed=retry_failed,
        rerun_changed=rerun_changed, report=False, progress=not quiet, dry_run=dry_run,
        calibrate=calibrate,
        say=lambda m: console.print(m, highlight=False, soft_wrap=True),
        warn=lambda m: err_console.print(m, highlight=False, soft_wrap=True)))
    if dry_run or calibrate:
        return
    summary = ", ".join(f"{n} {status}" for status, n in study.counts.items()) or "nothing to run"
    console.print(f"study {study.path}: {summary}", soft_wrap=True, highlight=False)
    if study.locked:
        console.print(f"{len(study.locked)} cells are held by other processes, not run here: "
                      + "; ".join(study.locked[:10]), soft_wrap=True, highlight=False)
    if report:
        paths = _guarded(study.report)
        console.print(f"report: {paths['html']}", soft_wrap=True, highlight=False)


@app.command("export")
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a finished run folder")],
    to: Annotated[Path, typer.Option(help="a new folder for the adapter")],
    merge: Annotated[bool, typer.Option(
        help="LoRA, IA3, LN: a full model folder with the adapter folded in")] = False,
    force: Annotated[bool, typer.Option(
        help="export a diverged run's state (its best checkpoint before diverging)")] = False,
) -> None:
    """Write a run's trained state as a peft adapter folder (PeftModel.from_pretrained loads
    it; prefix and LN tuning: a folder peftlab.load_adapter loads), or a merged model."""
    from peftlab.api import export

    folder = _guarded(lambda: export(run_dir, to, merge, force))
    console.print(f"exported: {folder}", soft_wrap=True, highlight=False)


@app.command("report")
def report_cmd(
    study_dir: Annotated[Path, typer.Argument(help="a study folder")],
    selection: Annotated[str | None, typer.Option(
        help="cross-fit (each seed's reported run chosen on the other seeds' validation) or "
             "grid (one choice on the mean over seeds); default: the study file's "
             "`selection`, else cross-fit")] = None,
) -> None:
    """Write report.md, report.html, CSV tables and figures from a study's run folders."""
    from peftlab.report import write_report

    paths = _guarded(lambda: write_report(study_dir, selection))
    for kind, path in paths.items():
        console.print(f"{kind}: {path}", soft_wrap=True, highlight=False)


@app.command("eval")
def eval_cmd(
    run_dir: Annotated[Path, typer.Option("--run", help="a run's output folder")],
    split: Annotated[str, typer.Option(help="test or validation")] = "test",
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Re-evaluate a saved run (base model + saved state) on one split."""
    from peftlab.run import reevaluate

    if split not in ("test", "validation"):
        err_console.print(f"[bold red]error:[/] --split must be test or validation, got {split!r}")
        raise typer.Exit(2)
    result = _guarded(lambda: reevaluate(run_dir, split, progress=not quiet))
    console.print(json.dumps(result.metrics, indent=2))


@app.command("methods")
def methods_cmd(
    model: Annotated[str, typer.Option(help="hub id, local folder or preset")] = "google/flan-t5-small",
) -> None:
    """List the methods with their default settings and exact trainable-parameter counts."""
    import torch

    from peftlab.families import family
    from peftlab.methods import METHODS, Baseline, MethodContext
    from peftlab.models import count_parameters, default_tokenizer_for, load_model

    table = Table(title=f"methods on {model}: parameters saved for inference and trained")
    for col in ("method", "trainable (inference)", "trained (training)", "% of total",
                "default lr", "default settings"):
        table.add_column(col, overflow="fold")

    def rows() -> None:
        kind = family(model)
        for name, m in METHODS.items():
            if isinstance(m, Baseline):
                table.add_row(name, "0 (no model)", "0", "-", "-", json.dumps(m.Args().model_dump()))
                continue
            try:
                m.check_family(kind, model)
            except ConfigError as e:
                table.add_row(name, "-", "-", "-", "-", str(e))
                continue
            args = m.Args.model_validate(m.defaults_for(kind))  # the family's defaults
            settings = json.dumps(args.model_dump())
            base = load_model(model)
            total = count_parameters(base)
            torch.manual_seed(0)
            adapted = m.apply(base, args, MethodContext(default_tokenizer_for(model), 1), False)
            trainable = sum(t.numel() for t in m.export_state(adapted).values())
            trained = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
            total += trainable if m.adds_parameters else 0
            lr = "-" if m.default_learning_rate is None else f"{m.default_learning_rate:g}"
            table.add_row(name, f"{trainable:,}", f"{trained:,}", f"{100 * trainable / total:.4f}",
                          lr, settings)

    _guarded(rows)
    # Off a terminal (a pipe, a log) rich assumes 80 columns and folds cells mid-word: the
    # table gets the width it needs instead.
    out = console if console.is_terminal else Console(width=1000)
    out.print(table)
    for name, m in METHODS.items():
        out.print(f"  [bold]{name}[/]: {m.summary}", highlight=False, soft_wrap=True)

