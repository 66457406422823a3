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

import shutil
import warnings
from pathlib import Path
from typing import Any

from peftlab import __version__
from peftlab.errors import PeftlabError
from peftlab.files import write_json
from peftlab.records import ADAPTER, CONFIG

MARKER = "peftlab_adapter.json"
MERGEABLE = ("lora", "ia3", "ln")


def export_run(run_dir: str | Path, to: str | Path, merge: bool = False) -> Path:
    """Write the run's selected state to the new folder `to` (refused if it holds files)."""
    from safetensors.torch import load_file

    from peftlab.methods import Baseline
    from peftlab.run import load_run_dir, setup

    cfg, run_dir = load_run_dir(run_dir)
    to = Path(to)
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise PeftlabError(f"{to}: exists and is not an empty folder; export into a new one")
    if not (run_dir / ADAPTER).is_file():
        raise PeftlabError(f"{run_dir}: no {ADAPTER} (a `{cfg.method}` run trains nothing, or "
                           "it has not finished)")
    if merge and cfg.method not in MERGEABLE:
        raise PeftlabError(f"--merge: `{cfg.method}` adds tensors the base model has no place "
                           f"for; mergeable: {', '.join(MERGEABLE)}")
    # the method's own modules, not a pack's routed ones: what peft saves and merges
    s = setup(cfg, for_inference=True, pack=False, data=False)
    if isinstance(s.method, Baseline) or s.model is None:
        raise PeftlabError(f"`{cfg.method}` has no model to export")
    s.method.load_state(s.model, load_file(str(run_dir / ADAPTER)))
    model = s.model.cpu().eval()
    if merge:
        with warnings.catch_warnings():
            # peft notes that input and output embeddings are untied after merging: Flan-T5's
            # are untied to begin with (peftlab.models)
            warnings.filterwarnings("ignore", message="Input and output embeddings are no "
                                    "longer tied")
            merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        merged.save_pretrained(to)
    elif hasattr(model, "peft_config"):
        model.save_pretrained(to)
    else:
        to.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / CONFIG, to / CONFIG)
        shutil.copyfile(run_dir / ADAPTER, to / ADAPTER)
        write_json(to / MARKER, {"method": cfg.method, "method_args": cfg.method_args,
                                 "model": cfg.model, "peftlab": __version__,
                                 "load": "peftlab.load_adapter(DIR)"})
    s.tokenizer.save_pretrained(to)
    return to


def load_adapter(folder: str | Path) -> tuple[Any, Any]:
    """A folder `export_run` wrote for peftlab's own methods: the base model with the state
    loaded, and the tokenizer."""
    from peftlab.run import restore

    folder = Path(folder)
    if not (folder / MARKER).is_file():
        raise PeftlabError(f"{folder}: no {MARKER}; a peft adapter folder loads with "
                           "PeftModel.from_pretrained(base_model, DIR)")
    s = restore(folder, data=False)
    return s.model.eval(), s.tokenizer
