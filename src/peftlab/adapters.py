"""A run's trained state in a form others load: a peft adapter folder, or a merged model.

- peft-backed methods (LoRA, (IA)^3, prompt tuning, other `peft` methods): a standard peft
  adapter folder (`adapter_config.json`, `adapter_model.safetensors`) that
  `PeftModel.from_pretrained(base_model, DIR)` loads, with the tokenizer beside it.
- prefix and layer-norm tuning (peftlab's own code): a self-describing folder, the run's
  resolved config and its saved state (`config.yaml`, `adapter.safetensors`, and
  `peftlab_adapter.json` naming method and base model), that `peftlab.load_adapter(DIR)` loads.
- `merge`: LoRA, (IA)^3 and layer-norm tuning folded into the base weights, saved as a full
  model folder that `AutoModelForSeq2SeqLM.from_pretrained(DIR)` loads.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from peftlab import __version__
from peftlab.errors import PeftlabError, describe_cause
from peftlab.families import family
from peftlab.files import atomic_write_text, write_json
from peftlab.methods import METHODS, Baseline, get_method
from peftlab.records import ADAPTER, CONFIG, SUMMARY, read_json
from peftlab.run import load_run_dir, restore, setup

MARKER = "peftlab_adapter.json"


def _exportable(run_dir: Path, method: str, force: bool) -> None:
    """Refuse a run that is unfinished or failed; a diverged one only with `force`."""
    if not (run_dir / SUMMARY).is_file():
        raise PeftlabError(f"{run_dir}: unfinished (no {SUMMARY}); run it to the end first "
                           "(the same command resumes it), then export")
    try:
        summary = read_json(run_dir / SUMMARY)
    except PeftlabError as e:
        raise PeftlabError(f"{e}; the run's record is damaged, nothing to export") from None
    status = summary.get("status") if isinstance(summary, dict) else None
    if status == "failed":
        raise PeftlabError(f"{run_dir}: the run failed ({summary.get('error', 'no error')}); "
                           "nothing to export")
    if status == "diverged" and not force:
        raise PeftlabError(
            f"{run_dir}: the run diverged; its saved state is its best checkpoint before that "
            f"(step {summary.get('best_step')}), which may be the untrained model. "
            "--force exports it anyway")
    if not (run_dir / ADAPTER).is_file():
        raise PeftlabError(f"{run_dir}: no {ADAPTER} (a `{method}` run trains nothing)")


def export_run(run_dir: str | Path, to: str | Path, merge: bool = False,
               force: bool = False) -> Path:
    """Write the run's selected state to the new folder `to` (refused if it holds files).

    The folder appears whole or not at all: everything is written into a hidden sibling that
    is renamed to `to` at the end, and removed if anything fails.
    """
    from safetensors.torch import load_file

    cfg, run_dir = load_run_dir(run_dir)
    to = Path(to)
    if to.resolve().is_relative_to(run_dir.resolve()):
        raise PeftlabError(f"{to}: inside the run folder {run_dir}; export to a folder outside "
                           "it (the run's own files are not to be mixed with a copy)")
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise PeftlabError(f"{to}: exists and is not an empty folder; export into a new one")
    _exportable(run_dir, cfg.method, force)
    if merge and not getattr(get_method(cfg.method), "mergeable", False):
        mergeable = [m.name for m in METHODS.values() if getattr(m, "mergeable", False)]
        raise PeftlabError(f"--merge: `{cfg.method}` adds tensors the base model has no place "
                           f"for; mergeable: {', '.join(mergeable)}")
    # the method's own modules, not a pack's routed ones: what peft saves and merges
    s = setup(cfg, for_inference=True, pack=False, data=False)
    if isinstance(s.method, Baseline) or s.model is None:
        raise PeftlabError(f"`{cfg.method}` has no model to export")
    s.method.load_state(s.model, load_file(str(run_dir / ADAPTER)))
    model = s.model.cpu().eval()
    partial = to.parent / f".{to.name}.partial-{os.getpid()}"
    step = "the folder"
    try:
        to.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        step = "the merged model" if merge else "the adapter"
        if merge:
            with warnings.catch_warnings():
                # peft notes that input and output embeddings are untied after merging:
                # Flan-T5's are untied to begin with (peftlab.models)
                warnings.filterwarnings("ignore", message="Input and output embeddings are "
                                        "no longer tied")
                merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") \
                    else model
            if getattr(merged.config, "tie_word_embeddings", False) and \
                    merged.get_output_embeddings() is not None and \
                    merged.get_output_embeddings().weight is not \
                    merged.get_input_embeddings().weight:
                # peftlab unties T5's head (peftlab.models): the folder says so, or loading it
                # warns that the config's tying is not applied
                merged.config.tie_word_embeddings = False
            with _quiet_progress():
                merged.save_pretrained(partial)
        elif hasattr(model, "peft_config"):
            with _quiet_progress():
                model.save_pretrained(partial)
            # peft leaves the base model empty (the model was built from a preset or a
            # folder); set after saving, as setting it before made peft look the name up on
            # the hub to check the vocabulary
            adapter_config = json.loads((partial / "adapter_config.json").read_text())
            adapter_config["base_model_name_or_path"] = cfg.model
            write_json(partial / "adapter_config.json", adapter_config)
        else:
            shutil.copyfile(run_dir / CONFIG, partial / CONFIG)
            shutil.copyfile(run_dir / ADAPTER, partial / ADAPTER)
            write_json(partial / MARKER, {"method": cfg.method, "method_args": cfg.method_args,
                                          "model": cfg.model, "peftlab": __version__,
                                          "load": "peftlab.load_adapter(DIR)"})
        step = "the tokenizer"
        s.tokenizer.save_pretrained(partial)
        step = "the card"
        atomic_write_text(partial / "README.md", model_card(
            cfg, run_dir, merge, own_format=(partial / MARKER).is_file()))
        step = "the folder's final name"
        if to.is_dir():
            to.rmdir()  # the empty folder checked above
        os.replace(partial, to)
    except Exception as e:  # noqa: BLE001  (tokenizers raise a bare Exception on a full disk)
        shutil.rmtree(partial, ignore_errors=True)
        where = f" ({e.filename})" if isinstance(e, OSError) and e.filename else ""
        cause = describe_cause(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
        raise PeftlabError(f"export to {to} failed while writing {step}{where}: {cause}. "
                           f"Nothing was left at {to}; fix that and export again") from None
    return to


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """No "Writing model shards" bar in an export's output."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def model_card(cfg: Any, run_dir: Path, merge: bool, own_format: bool) -> str:
    """A short README.md: what was trained on what, what it scored, how to load it, and the
    run's resolved config (peft's template card was left empty)."""
    summary = read_json(run_dir / SUMMARY)
    metrics = "\n".join(f"| {split} | {name} | {value:.4g} |"
                        for split in ("val", "test")
                        for name, value in (summary.get(f"{split}_metrics") or {}).items()
                        if isinstance(value, int | float))
    if merge:
        load = ("from transformers import AutoModelForSeq2SeqLM, AutoTokenizer\n"
                "model = AutoModelForSeq2SeqLM.from_pretrained(DIR)\n"
                "tokenizer = AutoTokenizer.from_pretrained(DIR)")
    elif own_format:
        load = "import peftlab\nmodel, tokenizer = peftlab.load_adapter(DIR)"
    else:
        load = ("from peft import PeftModel\nfrom transformers import AutoModelForSeq2SeqLM\n"
                f"base = AutoModelForSeq2SeqLM.from_pretrained({cfg.model!r})\n"
                "model = PeftModel.from_pretrained(base, DIR)")
    # transformers 5's T5Config always asks to tie the output embedding to the input one, so
    # loading any T5 v1.1 or Flan-T5 checkpoint (google's own too) logs a warning that reads
    # like damage: say what it means where the user meets it
    tie = ("\n\ntransformers 5 may log that `shared.weight` and `lm_head.weight` differ and "
           "\"will NOT tie them\": they are meant to differ (this model's output embedding is "
           "its own, as in every T5 v1.1 and Flan-T5 checkpoint), and the model loads as "
           "trained. `peftlab.models.silence_known_warnings()` drops that one message."
           if merge and family(cfg.model) == "t5" else "")
    return (f"---\nbase_model: {cfg.model}\nlibrary_name: {'transformers' if merge else 'peft'}"
            f"\ntags:\n- peftlab\n- {cfg.method}\n---\n\n"
            f"# {cfg.method} on {cfg.task}, base model {cfg.model}\n\n"
            f"Trained by peftlab {__version__}{' and merged into the base weights' if merge else ''}"
            f": {summary.get('train_size')} training examples, seed {cfg.seed}, learning rate "
            f"{cfg.learning_rate:g}, {summary.get('steps_done')} steps; the state exported is "
            f"the checkpoint chosen on validation (step {summary.get('best_step')}). Run "
            f"status: {summary.get('status')}.\n\n| split | metric | value |\n|---|---|---|\n"
            f"{metrics}\n\n## Load\n\n```python\n{load}\n```{tie}\n\n## The run's config\n\n"
            f"```yaml\n{yaml.safe_dump(cfg.model_dump(), sort_keys=False)}```\n")


def load_adapter(folder: str | Path) -> tuple[Any, Any]:
    """A folder `export_run` wrote for peftlab's own methods: the base model with the state
    loaded, and the tokenizer."""
    folder = Path(folder)
    if not (folder / MARKER).is_file():
        raise PeftlabError(f"{folder}: no {MARKER}; a peft adapter folder loads with "
                           "PeftModel.from_pretrained(base_model, DIR)")
    s = restore(folder, data=False)
    return s.model.eval(), s.tokenizer
