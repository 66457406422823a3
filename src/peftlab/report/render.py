"""The report's text: its introduction, notes, tables as Markdown and HTML, the appendix.
Everything here formats numbers computed elsewhere (peftlab.report)."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

import pandas as pd

from peftlab.report import notes
from peftlab.report.stats import MIN_SEEDS, POWER, TEST_NAME

EDGE_MARK, STEP0_MARK = "†", "‡"


def format_rate(v: Any) -> str:
    """Learning rates as written in the study file (3e-4, not 0.000 or 0.0003000)."""
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:g}"


def _md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


SELECTION_TEXT = {
    "cross-fit": ("each seed's reported run uses the learning rate (and, for a method, the size) "
                  "with the best mean validation score over the other seeds (cross-fit "
                  "selection: a seed's luck cannot select itself)"),
    "grid": ("the learning rate (and, for a method, the size) with the best mean validation "
             "score over seeds is reported for every seed (grid selection: the seeds that "
             "choose are the seeds reported, which favours methods that search more "
             "configurations)"),
}


def introduction(runs: pd.DataFrame, selection: str) -> list[str]:
    """The paragraphs before the findings: what was run and how each number was made."""
    models = sorted(runs.model.dropna().unique()) if "model" in runs else []
    tasks = sorted(runs.task.dropna().unique())
    model_text = ", ".join(notes.describe_model(m) for m in models) or "not recorded"
    paras = [
        f"Model: {model_text}. `untuned` is this model as loaded, evaluated at step 0 (no "
        "training). Test metrics are on a 0-100 scale: means ± standard deviation over "
        f"seeds, with a 95% Student-t interval over seeds (clipped to 0-100; shown from "
        f"{MIN_SEEDS} seeds up). The interval is over seeds with the test set held fixed: it "
        "says how much another seed (training sample, initialisation, data order) would move "
        "the mean on this test set, not how the score would move on another test set; the "
        "tests between methods below carry both.",
        f"Selection, on validation only: {SELECTION_TEXT[selection]}. Each run's checkpoint is "
        "also chosen on validation, and the test set was evaluated once per run. The tables say "
        f"how many rates each configuration tried and how many configurations each method "
        f"searched; {EDGE_MARK} marks a rate at the edge of its candidates (the best may lie "
        f"outside), {STEP0_MARK}k/n a configuration whose selected checkpoint is step 0 (the "
        "untrained model) for k of its n seeds. The expected-search figures (Dodge et al. "
        "2019; unbiased estimator of Tang et al. 2020) show the best validation score a "
        "method reaches after trying n of its configurations at random, and the test score "
        "of that choice: a method that searched more configurations had more chances.",
        "`trainable (inference)` counts what a method saves and adds at inference; `trained "
        "(training)` what the optimizer updated (prefix tuning's MLP reparameterisation trains "
        "more than the prefixes it folds into). Runs trained in packs (`peftlab run --pack P`) "
        "show their share of the pack's wall time, and the pack's peak memory (marked).",
        f"Differences between methods: a {TEST_NAME}; it carries both the variation between "
        "seeds and the variation between test examples, and holds its level at 0.05, 0.01 "
        "and 0.001 in simulation. Each method's reported configuration is compared with the "
        "best trained method (chosen on validation), full fine-tuning and the untuned model; "
        "p-values are Holm-adjusted within each task and training-set size (every pair of "
        f"configurations is in significance.csv). Below {MIN_SEEDS} seeds nothing is tested "
        "and no interval is given. Each comparison shows the smallest difference it could "
        f"detect at {POWER:.0%} power (two-sided 0.05, unadjusted: a lower bound after Holm), "
        "so that 'not significant' is read with its power.",
    ]
    for task in tasks:
        note = notes.test_split_note(task)
        if note:
            paras.append(f"{task}: {note}.")
    for model in models:
        paras += [f"{text}." for text in notes.overlaps(model, tasks)]
    return paras


APPENDIX_COLUMNS = ["key", "status", "selected", "learning_rate", "seed", "val_score", "test_score",
                    "best_step", "step0_val", "final_val", "flag_loss_fell_metric_fell"]


def _appendix(runs: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in APPENDIX_COLUMNS if c in runs.columns]
    table = runs[cols].sort_values("key").copy()
    table["learning_rate"] = table.learning_rate.map(format_rate)
    for c in ("val_score", "test_score", "step0_val", "final_val"):
        if c in table:
            table[c] = table[c].map(lambda v: "—" if pd.isna(v) else f"{v:.2f}")
    for c in ("seed", "best_step"):
        if c in table:
            table[c] = table[c].map(lambda v: "—" if pd.isna(v) else str(int(v)))
    return table


SIGNIFICANCE_NOTE = ("Difference (this method minus the reference) [95% CI, not adjusted for "
                     "the number of comparisons], Holm-adjusted p, and the smallest difference "
                     f"the comparison detects at {POWER:.0%} power; **bold**: significant at 0.05 "
                     "after adjustment. A CI that excludes 0 with a Holm-adjusted p above 0.05 is "
                     "a difference the family of comparisons does not support. `configs "
                     "searched`: sizes x learning rates the method chose among on validation.")
HEADLINE_NOTE = (f"{EDGE_MARK} the learning rate is the smallest or largest candidate; "
                 f"{STEP0_MARK}k/n: the selected checkpoint is step 0 (untrained) for k of n "
                 "seeds; `lr a (2 seeds), b (1)`: cross-fit chose per seed.")


def _task_heading(task: str, label: str) -> str:
    note = notes.test_split_note(task)
    return f"{task}: test {label}" + (" (test = GLUE dev)" if note and "GLUE" in note else "")


def render_markdown(intro, sections, runs, found) -> str:
    parts = ["# Study report", ""]
    for para in intro:
        parts += [para, ""]
    parts += ["## Findings", ""]
    parts += [f"- {n}" for n in found]
    for task, label, table, sig_table, figs in sections:
        parts += ["", f"## {_task_heading(task, label)}", "", _md_table(table), "",
                  HEADLINE_NOTE, ""]
        parts += [f"![{f.stem}](figures/{f.name})" for f in figs]
        parts += ["", f"### {task}: differences between methods", "", SIGNIFICANCE_NOTE, "",
                  _md_table(sig_table)]
    parts += ["", "## Appendix: every run", "", _md_table(_appendix(runs)), ""]
    return "\n".join(parts)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}"></figure>'


def _html_table(df: pd.DataFrame) -> str:
    """Bold markers (**x**) as <b>; everything else escaped."""
    text = df.to_html(index=False, escape=True)
    parts = text.split("**")
    return "".join(p if i % 2 == 0 else f"<b>{p}</b>" for i, p in enumerate(parts))


def render_html(intro, sections, runs, found) -> str:
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
             "img{max-width:100%;border:1px solid #eee}figure{margin:1em 0}")
    body = ["<h1>Study report</h1>"] + [f"<p>{html.escape(p)}</p>" for p in intro]
    body.append("<h2>Findings</h2><ul>")
    body += [f"<li>{html.escape(n)}</li>" for n in found]
    body.append("</ul>")
    for task, label, table, sig_table, figs in sections:
        body.append(f"<h2>{html.escape(_task_heading(task, label))}</h2>")
        body.append(_html_table(table))
        body.append(f"<p>{html.escape(HEADLINE_NOTE)}</p>")
        body += [_img(f) for f in figs]
        body.append(f"<h3>{html.escape(task)}: differences between methods</h3>"
                    f"<p>{html.escape(SIGNIFICANCE_NOTE.replace('**bold**', 'bold'))}</p>")
        body.append(_html_table(sig_table))
    body.append("<h2>Appendix: every run</h2>")
    body.append(_appendix(runs).to_html(index=False, escape=True))
    # The page marks itself when every figure has decoded: the browser test reads this.
    script = ("<script>window.addEventListener('load',()=>{const i=[...document.images];"
              "document.body.dataset.figuresLoaded=i.filter(x=>x.complete&&x.naturalWidth>0)"
              ".length+'/'+i.length;});</script>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>peftlab study report"
            f"</title><style>{style}</style></head><body>{''.join(body)}{script}</body></html>")
