"""`peftlab report STUDY_DIR`: tables, figures, statistics and findings from run folders only."""

from __future__ import annotations

import base64
import html
import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from peftlab.errors import PeftlabError
from peftlab.files import atomic_write_text
from peftlab.report import figures
from peftlab.report.load import (
    expand_shared,
    load_runs,
    missing_runs,
    per_example_scores,
    select_learning_rates,
    train_sizes,
)
from peftlab.report.stats import holm, mean_ci, paired_bootstrap

REFERENCES = figures.REFERENCE_METHODS


def headline_table(view: pd.DataFrame) -> pd.DataFrame:
    """Per (task, train size, method+size): the selected rate's test mean +- std and 95% CI."""
    rows = []
    chosen = view[view.selected]
    for (task, size, label), g in chosen.groupby(["task", "train_size", "label"], dropna=False):
        mean, std, low, high = mean_ci(g.test_score.to_numpy(dtype=float))
        first = g.iloc[0]
        rows.append({
            "task": task, "train_size": size, "label": label, "method_name": first.method_name,
            "method": first.method, "size_knob": first.size_knob, "size_value": first.size_value,
            "lr": first.learning_rate if pd.notna(first.learning_rate) else math.nan,
            "metric": first.metric, "higher_is_better": bool(first.higher_is_better),
            "seeds": len(g), "test_mean": mean, "test_std": std, "ci_low": low, "ci_high": high,
            "val_mean": float(g.val_score.mean()),
            "trainable_params": int(first.trainable_params or 0),
            "trainable_percent": float(first.trainable_percent or 0.0),
            "wall_time_s": float(g.wall_time_s.mean()),
            "peak_memory_mb": float(g.peak_memory_mb.mean()),
            "diverged": int((g.status == "diverged").sum()),
            "keys": list(g.key),
        })
    return pd.DataFrame(rows)


def significance_table(study_dir: Path, best: pd.DataFrame) -> pd.DataFrame:
    """Paired bootstrap between each pair of methods (best configuration each) per size."""
    rows = []
    for (task, size), g in best.groupby(["task", "train_size"]):
        g = g.sort_values("method_name")
        scores = {}  # label -> {example id: score}, each configuration's files read once
        for _, cfg in g.iterrows():
            ids, values = per_example_scores(study_dir, cfg["keys"])
            scores[cfg.label] = dict(zip(ids, values))
        family = []
        for (_, a), (_, b) in itertools.combinations(g.iterrows(), 2):
            common = sorted(set(scores[a.label]) & set(scores[b.label]))
            sa = np.array([scores[a.label][i] for i in common])
            sb = np.array([scores[b.label][i] for i in common])
            result = paired_bootstrap(sa, sb)
            family.append({"task": task, "train_size": size, "a": a.label, "b": b.label,
                           "metric": a.metric, "examples": len(common),
                           "difference": result.difference, "ci_low": result.ci_low,
                           "ci_high": result.ci_high, "p_value": result.p_value})
        for row, adjusted in zip(family, holm([r["p_value"] for r in family])):
            row["p_holm"] = adjusted
            row["significant"] = adjusted < 0.05
        rows.extend(family)
    return pd.DataFrame(rows)


def _fmt(v: float, digits: int = 1) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _cell(row: pd.Series) -> str:
    text = f"{_fmt(row.test_mean)} ± {_fmt(row.test_std)}"
    if not math.isnan(row.ci_low):
        text += f" [{_fmt(row.ci_low)}, {_fmt(row.ci_high)}]"
    return text


def findings(runs: pd.DataFrame, headline: pd.DataFrame, best: pd.DataFrame,
             sig: pd.DataFrame, missing: list[str]) -> list[str]:
    """Sentences generated from the numbers."""
    out = []
    for (task, size), g in best.groupby(["task", "train_size"]):
        higher = bool(g.higher_is_better.iloc[0])
        metric = g.metric.iloc[0]
        trained = g[~g.method_name.isin(REFERENCES)].sort_values("test_mean", ascending=not higher)
        if trained.empty:
            continue
        top = trained.iloc[0]
        text = (f"{task}, {size} training examples: {top.label} scores best on test {metric} "
                f"({_fmt(top.test_mean)} ± {_fmt(top.test_std)} over {top.seeds} seeds, "
                f"learning rate {top.lr:g} chosen on validation)")
        if len(trained) > 1:
            second = trained.iloc[1]
            pair = sig[(sig.task == task) & (sig.train_size == size)
                       & (((sig.a == top.label) & (sig.b == second.label))
                          | ((sig.a == second.label) & (sig.b == top.label)))]
            text += f"; runner-up {second.label} ({_fmt(second.test_mean)})"
            if not pair.empty:
                p = pair.iloc[0]
                sign = 1 if p.a == top.label else -1
                verdict = "significant" if p.significant else "not significant"
                text += (f", difference {sign * p.difference:+.2f} (95% CI "
                         f"[{min(sign * p.ci_low, sign * p.ci_high):.2f}, "
                         f"{max(sign * p.ci_low, sign * p.ci_high):.2f}], Holm-adjusted "
                         f"p = {p.p_holm:.3g}, {verdict})")
        out.append(text + ".")
        untuned = g[g.method_name == "untuned"]
        if not untuned.empty:
            level = untuned.test_mean.iloc[0]
            worse = trained[(trained.test_mean < level) if higher else (trained.test_mean > level)]
            if not worse.empty:
                names = ", ".join(f"{r.label} ({r.test_mean - level:+.1f})" for _, r in worse.iterrows())
                out.append(f"{task}, {size} examples: training hurt against the untuned model "
                           f"({_fmt(level)}): {names}.")
    flags = runs.get("flag_loss_fell_metric_fell")
    flagged = runs[flags.fillna(False).astype(bool)] if flags is not None else runs.iloc[:0]
    if len(flagged):
        keys = ", ".join(flagged.key.head(12)) + (" ..." if len(flagged) > 12 else "")
        out.append(f"{len(flagged)} of {len(runs)} runs ended with a validation metric below "
                   f"their untrained (step-0) value while their training loss fell - the "
                   f"failure the published study reported without diagnosing: {keys}.")
    else:
        out.append("No run ended with its validation metric below its step-0 value while its "
                   "training loss fell.")
    for status in ("diverged", "failed"):
        bad = runs[runs.status == status]
        if len(bad):
            out.append(f"{len(bad)} runs {status}: {', '.join(bad.key.head(12))}.")
    if missing:
        out.append(f"{len(missing)} runs of the grid have no result yet (the study is "
                   "unfinished): the tables use the finished ones.")
    return out


def _md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def display_headline(headline: pd.DataFrame, task: str, sizes: list) -> pd.DataFrame:
    t = headline[headline.task == task]
    rows = []
    order = sorted(t.label.unique(), key=lambda lab: (
        t[t.label == lab].method_name.iloc[0] not in REFERENCES,
        t[t.label == lab].method_name.iloc[0], t[t.label == lab].trainable_params.iloc[0]))
    for label in order:
        g = t[t.label == label]
        first = g.iloc[0]
        row: dict[str, Any] = {"method": label, "trainable": f"{first.trainable_params:,}",
                               "%": f"{first.trainable_percent:.3g}"}
        for size in sizes:
            cell = g[g.train_size == size]
            row[f"n={size}"] = _cell(cell.iloc[0]) if len(cell) else ""
            if len(cell) and not math.isnan(cell.iloc[0].lr):
                row[f"n={size}"] += f" lr {cell.iloc[0].lr:g}"
        row["wall s/run"] = _fmt(g.wall_time_s.mean())
        row["peak MB"] = _fmt(g.peak_memory_mb.mean(), 0)
        rows.append(row)
    return pd.DataFrame(rows)


def write_report(study_dir: str | Path) -> dict[str, Path]:
    """Read the run folders; write tables (CSV), figures (PNG, SVG), report.md, report.html."""
    study_dir = Path(study_dir)
    runs = select_learning_rates(load_runs(study_dir))
    view = expand_shared(runs)
    headline = headline_table(view)
    if headline.empty:
        failed = runs[runs.status == "failed"]
        first = f"; first error: {failed.error.iloc[0]}" if len(failed) else ""
        raise PeftlabError(f"{study_dir}: no completed run to report on "
                           f"({len(failed)} failed){first}")
    best = figures.best_configs(headline)
    sig = significance_table(study_dir, best)
    missing = missing_runs(study_dir, runs)
    out = study_dir / "report"
    fig_dir = out / "figures"
    sections: list[tuple[str, str, list[Path]]] = []  # (task, markdown table, figures)
    for task in sorted(headline.task.unique()):
        sizes = train_sizes(runs, task)
        table = display_headline(headline, task, sizes)
        figs = [figures.learning_curves(study_dir, view, best, task, s, fig_dir) for s in sizes]
        figs += [figures.efficiency(headline, task, s, fig_dir) for s in sizes]
        figs.append(figures.data_scaling(best, task, fig_dir))
        sections.append((task, table, figs))
    notes = findings(runs, headline, best, sig, missing)

    out.mkdir(parents=True, exist_ok=True)
    runs.drop(columns=["error"]).to_csv(out / "runs.csv", index=False)
    headline.drop(columns=["keys"]).to_csv(out / "headline.csv", index=False)
    sig.to_csv(out / "significance.csv", index=False)

    md = render_markdown(sections, sig, runs, notes, out)
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.html", render_html(sections, sig, runs, notes))
    return {"markdown": out / "report.md", "html": out / "report.html",
            "headline": out / "headline.csv", "runs": out / "runs.csv",
            "significance": out / "significance.csv", "figures": fig_dir}


INTRO = ("Test metrics are means ± standard deviation over seeds with a 95% Student-t "
         "interval, for the learning rate chosen per method, size and training-set size by "
         "the best mean validation score (the test set was evaluated once per run, on the "
         "checkpoint chosen on validation). `untuned` is the loaded instruction-tuned model "
         "at step 0, not a zero-shot model: Flan-T5 saw SST-2 and SAMSum in instruction "
         "tuning.")

APPENDIX_COLUMNS = ["key", "status", "selected", "learning_rate", "seed", "val_score", "test_score",
                    "best_step", "step0_val", "final_val", "flag_loss_fell_metric_fell"]


def _sig_display(sig: pd.DataFrame) -> pd.DataFrame:
    if sig.empty:
        return sig
    d = sig[["task", "train_size", "a", "b", "difference", "ci_low", "ci_high", "p_value",
             "p_holm", "significant"]].copy()
    for c in ("difference", "ci_low", "ci_high"):
        d[c] = d[c].map(lambda v: f"{v:+.2f}")
    for c in ("p_value", "p_holm"):
        d[c] = d[c].map(lambda v: f"{v:.3g}")
    return d


def _appendix(runs: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in APPENDIX_COLUMNS if c in runs.columns]
    return runs[cols].sort_values("key").round(3)


def render_markdown(sections, sig, runs, notes, out: Path) -> str:
    parts = ["# Study report", "", INTRO, "", "## Findings", ""]
    parts += [f"- {n}" for n in notes]
    for task, table, figs in sections:
        parts += ["", f"## {task}", "", _md_table(table), ""]
        parts += [f"![{f.stem}](figures/{f.name})" for f in figs]
    parts += ["", "## Significance (paired bootstrap over test examples, 10,000 resamples; "
              "Holm-adjusted p within each task and size)", "", _md_table(_sig_display(sig)),
              "", "## Appendix: every run", "", _md_table(_appendix(runs)), ""]
    return "\n".join(parts)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}"></figure>'


def render_html(sections, sig, runs, notes) -> str:
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
             "img{max-width:100%;border:1px solid #eee}figure{margin:1em 0}")
    body = [f"<h1>Study report</h1><p>{html.escape(INTRO)}</p><h2>Findings</h2><ul>"]
    body += [f"<li>{html.escape(n)}</li>" for n in notes]
    body.append("</ul>")
    for task, table, figs in sections:
        body.append(f"<h2>{html.escape(task)}</h2>")
        body.append(table.to_html(index=False, escape=True, classes="headline"))
        body += [_img(f) for f in figs]
    body.append("<h2>Significance (paired bootstrap over test examples)</h2>")
    body.append(_sig_display(sig).to_html(index=False, escape=True))
    body.append("<h2>Appendix: every run</h2>")
    body.append(_appendix(runs).to_html(index=False, escape=True))
    # The page marks itself when every figure has decoded: the browser test reads this.
    script = ("<script>window.addEventListener('load',()=>{const i=[...document.images];"
              "document.body.dataset.figuresLoaded=i.filter(x=>x.complete&&x.naturalWidth>0)"
              ".length+'/'+i.length;});</script>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>peftlab study report"
            f"</title><style>{style}</style></head><body>{''.join(body)}{script}</body></html>")
