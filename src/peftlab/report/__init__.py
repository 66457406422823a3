"""`peftlab report STUDY_DIR`: tables, figures, statistics and findings from run folders only."""

from __future__ import annotations

import base64
import html
import itertools
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from peftlab.errors import PeftlabError
from peftlab.files import atomic_write_text
from peftlab.memory import KIND_LABELS
from peftlab.report import figures
from peftlab.report.load import (
    example_scores,
    expand_shared,
    load_runs,
    missing_runs,
    select_learning_rates,
    train_sizes,
)
from peftlab.report.stats import TEST_NAME, Comparison, crossed_test, holm, mean_ci

REFERENCES = figures.REFERENCE_METHODS
MIN_SEEDS_FOR_CI = 3  # a t-interval from 2 seeds (1 df) is 12.7 standard errors wide
METRIC_LABELS = {
    "accuracy": "accuracy (%)",
    "generation_exact_match": "exact match of free generation (%)",
    "rouge1": "ROUGE-1 F1", "rouge2": "ROUGE-2 F1", "rougeL": "ROUGE-L F1 (sentence-level)",
    "rougeLsum": "ROUGE-Lsum F1 (summary-level, the papers' R-L)",
    "loss": "loss",
}


SHORT_LABELS = {"accuracy": "accuracy (%)", "generation_exact_match": "exact match (%)",
                "rougeLsum": "ROUGE-Lsum", "rougeL": "ROUGE-L", "rouge1": "ROUGE-1",
                "rouge2": "ROUGE-2"}


def metric_label(metric: str, short: bool = False) -> str:
    """How tables (long) and figures (short) name a metric."""
    return (SHORT_LABELS if short else METRIC_LABELS).get(metric, metric)


def headline_table(view: pd.DataFrame) -> pd.DataFrame:
    """Per (task, train size, method+size): the selected rate's test mean +- std and 95% CI
    over the seeds whose score is finite (a diverged run with no finite score counts none)."""
    rows = []
    chosen = view[view.selected]
    for (task, size, label), g in chosen.groupby(["task", "train_size", "label"], dropna=False):
        scores = g.test_score.to_numpy(dtype=float)
        finite = np.isfinite(scores)
        mean, std, low, high = mean_ci(scores)
        first = g.iloc[0]
        if finite.sum() < MIN_SEEDS_FOR_CI:
            low = high = math.nan
        elif first.metric != "loss":  # every other metric is a percentage: 0 to 100
            low, high = max(low, 0.0), min(high, 100.0)
        rows.append({
            "task": task, "train_size": size, "label": label, "method_name": first.method_name,
            "method": first.method, "size_knob": first.size_knob, "size_value": first.size_value,
            "lr": first.learning_rate if pd.notna(first.learning_rate) else math.nan,
            "metric": first.metric, "higher_is_better": bool(first.higher_is_better),
            "seeds": int(finite.sum()), "test_mean": mean, "test_std": std, "ci_low": low,
            "ci_high": high, "val_mean": float(g.val_score.mean()),
            "trainable_params": int(first.trainable_params or 0),
            "trained_params": int(first.trained_params or 0),
            "trainable_percent": float(first.trainable_percent or 0.0),
            "wall_time_s": float(g.wall_time_s.mean()),
            "peak_memory_mb": float(g.peak_memory_mb.mean()),
            "peak_memory_kind": str(first.peak_memory_kind),
            "pack_size": int(g.pack_size.max()) if "pack_size" in g else 1,
            "diverged": int((g.status == "diverged").sum()),
            "seedless": bool(first.shared_across_sizes),
            "keys": list(g.key[finite]), "run_seeds": list(g.seed[finite]),
            "run_scores": list(scores[finite]),
        })
    return pd.DataFrame(rows)


def top_trained(best: pd.DataFrame) -> pd.Series | None:
    """The best trained method's configuration by test mean (None if none trained)."""
    trained = best[~best.method_name.isin(REFERENCES) & best.test_mean.notna()]
    if trained.empty:
        return None
    higher = bool(trained.higher_is_better.iloc[0])
    return trained.sort_values("test_mean", ascending=not higher).iloc[0]


def reference_roles(best: pd.DataFrame) -> dict[str, list[str]]:
    """label -> roles: the configurations every method is compared against in the report."""
    roles: dict[str, list[str]] = {}
    top = top_trained(best)
    if top is not None:
        roles.setdefault(top.label, []).append("best")
    for name in ("full", "untuned"):
        rows = best[best.method_name == name]
        if len(rows):
            roles.setdefault(rows.iloc[0].label, []).append(name)
    return roles


def _seed_scores(study_dir: Path, row: pd.Series) -> dict[Any, dict[str, float]]:
    """{seed: {example id: score}} of one configuration's runs (finite test scores only)."""
    return {seed: example_scores(study_dir, key, row.metric, score)
            for key, seed, score in zip(row["keys"], row["run_seeds"], row["run_scores"])}


def compare(a: dict, a_seedless: bool, b: dict, b_seedless: bool) -> Comparison:
    """The crossed test between two configurations, paired by seed and test example.

    A configuration that depends on no seed (untuned, lead-3) is the same run for every seed
    of the other. Two that both depend on it are paired on the seeds they share (the same seed
    draws the same training sample); fewer than 2 shared seeds leave the seed variance
    unknown, and the comparison untested (NaN).
    """
    if a_seedless and b_seedless:
        pairs = [(next(iter(a.values())), next(iter(b.values())))]
    elif a_seedless:
        pairs = [(next(iter(a.values())), b[s]) for s in sorted(b)]
    elif b_seedless:
        pairs = [(a[s], next(iter(b.values()))) for s in sorted(a)]
    else:
        pairs = [(a[s], b[s]) for s in sorted(set(a) & set(b))]
    if not pairs or (len(pairs) < 2 and not (a_seedless and b_seedless)):
        return Comparison(math.nan, math.nan, math.nan, math.nan, math.nan, len(pairs), 0)
    ids = sorted(set.intersection(*(set(x) & set(y) for x, y in pairs)))
    d = np.array([[x[i] - y[i] for i in ids] for x, y in pairs])
    return crossed_test(d)


def significance_table(study_dir: Path, headline: pd.DataFrame, best: pd.DataFrame
                       ) -> pd.DataFrame:
    """Every pair of configurations per task and size, with the crossed test; `shown` marks
    the family the report presents and its findings use: each method's best configuration
    against the best trained method, against full fine-tuning and against the untuned model,
    Holm-adjusted within that family (`p_holm`); `p_holm_all_pairs` adjusts over every pair."""
    rows = []
    for (task, size), variants in headline.groupby(["task", "train_size"]):
        chosen = best[(best.task == task) & (best.train_size == size)]
        scores = {r.label: _seed_scores(study_dir, r) for _, r in variants.iterrows()}
        seedless = dict(zip(variants.label, variants.seedless))
        roles = reference_roles(chosen)
        shown: dict[tuple[str, str], list[str]] = {}
        for method in chosen.label:
            for ref, ref_roles in roles.items():
                if method != ref and (ref, method) not in shown:
                    shown[(method, ref)] = ref_roles
        pairs = dict(shown)
        for a, b in itertools.combinations(sorted(variants.label), 2):
            if (a, b) not in pairs and (b, a) not in pairs:
                pairs[(a, b)] = []
        family = []
        bounded = variants.metric.iloc[0] != "loss"  # two 0-100 scores differ by -100..100
        for (a, b), ref_roles in pairs.items():
            c = compare(scores[a], seedless[a], scores[b], seedless[b])
            if bounded:
                c = replace(c, ci_low=max(c.ci_low, -100.0), ci_high=min(c.ci_high, 100.0))
            family.append({
                "task": task, "train_size": size, "a": a, "b": b, "b_role": ", ".join(ref_roles),
                "shown": bool(ref_roles), "metric": variants.metric.iloc[0],
                "difference": c.difference, "ci_low": c.ci_low, "ci_high": c.ci_high,
                "p_value": c.p_value, "df": c.df, "seeds": c.seeds, "examples": c.examples})
        for row, adjusted in zip(family, holm([r["p_value"] for r in family])):
            row["p_holm_all_pairs"] = adjusted
        displayed = [r for r in family if r["shown"]]
        for row, adjusted in zip(displayed, holm([r["p_value"] for r in displayed])):
            row["p_holm"] = adjusted
        for row in family:
            row.setdefault("p_holm", math.nan)
            row["significant"] = bool(row["p_holm"] < 0.05) if row["shown"] else None
        rows.extend(family)
    return pd.DataFrame(rows)


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def _lr(v: Any) -> str:
    """Learning rates as written in the study file (3e-4, not 0.000 or 0.0003000)."""
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:g}"


def _cell(row: pd.Series, seeds: int) -> str:
    if row.seedless:  # one run that no seed changes (untuned, lead-3): no spread to show
        return f"{_fmt(row.test_mean)} (one run)"
    text = f"{_fmt(row.test_mean)} ± {_fmt(row.test_std)}"
    if not math.isnan(row.ci_low):
        text += f" [{_fmt(row.ci_low)}, {_fmt(row.ci_high)}]"
    if not row.seedless and row.seeds != seeds:
        text += f" ({row.seeds} seeds)"
    return text


def _verdict(p: pd.Series) -> str:
    if math.isnan(p.p_holm):
        return "not tested (fewer than 2 shared seeds)"
    if not p.significant:
        return "not significant"
    return "significantly higher" if p.difference > 0 else "significantly lower"


def _difference(p: pd.Series) -> str:
    if math.isnan(p.p_holm):
        return f"{p.difference:+.1f}, not tested"
    return (f"{p.difference:+.1f} (95% CI [{p.ci_low:+.1f}, {p.ci_high:+.1f}], unadjusted; "
            f"Holm-adjusted p = {p.p_holm:.2g}, {_verdict(p)})")


def _pair(sig: pd.DataFrame, task: str, size: Any, a: str, b: str) -> pd.Series | None:
    """The shown comparison of a against b, oriented a - b."""
    rows = sig[(sig.task == task) & (sig.train_size == size) & sig.shown]
    hit = rows[(rows.a == a) & (rows.b == b)]
    if len(hit):
        return hit.iloc[0]
    hit = rows[(rows.a == b) & (rows.b == a)]
    if len(hit):
        p = hit.iloc[0].copy()
        p["difference"], p["ci_low"], p["ci_high"] = -p.difference, -p.ci_high, -p.ci_low
        p["a"], p["b"] = a, b
        return p
    return None


def findings(runs: pd.DataFrame, best: pd.DataFrame, sig: pd.DataFrame,
             missing: list[str]) -> list[str]:
    """Sentences generated from the numbers, about this study only; each claim of a
    difference comes from the shown family of tests (crossed test, Holm-adjusted)."""
    out = []
    for (task, size), g in best.groupby(["task", "train_size"]):
        top = top_trained(g)
        if top is None:
            continue
        metric = metric_label(top.metric)
        text = (f"{task}, {size} training examples: the best trained method on test {metric} "
                f"is {top.label}, {_fmt(top.test_mean)} ± {_fmt(top.test_std)} over "
                f"{top.seeds} seeds (its size and its learning rate, {_lr(top.lr)}, chosen on "
                "validation).")
        higher = bool(top.higher_is_better)
        refs = g[g.method_name.isin(REFERENCES)].sort_values("test_mean", ascending=not higher)
        phrases, not_above = [], []
        for _, ref in refs.iterrows():
            p = _pair(sig, task, size, top.label, ref.label)
            if p is None:
                continue
            phrases.append(f"{ref.label} ({_fmt(ref.test_mean)}): {_difference(p)}")
            if not (p.significant and (p.difference > 0) == higher):
                not_above.append(ref.label)
        if phrases:
            text += " Against the untuned model and the baselines: " + "; ".join(phrases) + "."
        if not_above:
            text += (f" So {top.label}, the best trained method, is not shown to be better than "
                     f"{' or '.join(not_above)} here.")
        trained = g[~g.method_name.isin(REFERENCES) & (g.label != top.label)]
        if len(trained):
            second = trained.sort_values("test_mean", ascending=not higher).iloc[0]
            p = _pair(sig, task, size, second.label, top.label)
            if p is not None:
                text += (f" Runner-up {second.label} ({_fmt(second.test_mean)}) against "
                         f"{top.label}: {_difference(p)}.")
        out.append(text)
        untuned = g[g.method_name == "untuned"]
        if not untuned.empty:
            level = untuned.iloc[0]
            hurt = []
            for _, r in g[~g.method_name.isin(REFERENCES)].iterrows():
                p = _pair(sig, task, size, r.label, level.label)
                if p is not None and p.significant and (p.difference < 0) == higher:
                    hurt.append(f"{r.label} ({p.difference:+.1f})")
            if hurt:
                out.append(f"{task}, {size} examples: significantly below the untuned model "
                           f"({_fmt(level.test_mean)}) after training: {', '.join(hurt)}.")
    flags = runs.get("flag_loss_fell_metric_fell")
    flagged = runs[flags.fillna(False).astype(bool)] if flags is not None else runs.iloc[:0]
    if len(flagged):
        keys = ", ".join(flagged.key.head(12)) + (" ..." if len(flagged) > 12 else "")
        out.append(f"{len(flagged)} of {len(runs)} runs ended with a validation metric below "
                   f"their untrained (step-0) value while their training loss fell: {keys}.")
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


def _memory_column(kinds: pd.Series) -> str:
    known = sorted(set(kinds))
    return KIND_LABELS.get(known[0], "peak MB") if len(known) == 1 else "peak MB (mixed kinds)"


def display_headline(headline: pd.DataFrame, task: str, sizes: list) -> pd.DataFrame:
    t = headline[headline.task == task]
    seeds = int(t[~t.seedless].seeds.max()) if (~t.seedless).any() else 1
    rows = []
    order = sorted(t.label.unique(), key=lambda lab: (
        t[t.label == lab].method_name.iloc[0] not in REFERENCES,
        t[t.label == lab].method_name.iloc[0], t[t.label == lab].trainable_params.iloc[0]))
    memory = _memory_column(t.peak_memory_kind)
    if "pack_size" in t and (t.pack_size > 1).any():
        memory = memory.replace("this run)", "this run, or its pack)")
    for label in order:
        g = t[t.label == label]
        first = g.iloc[0]
        row: dict[str, Any] = {"method": label,
                               "trainable (inference)": f"{first.trainable_params:,}",
                               "trained (training)": f"{first.trained_params:,}",
                               "% of total": f"{first.trainable_percent:.3g}"}
        for size in sizes:
            cell = g[g.train_size == size]
            row[f"n={size}"] = _cell(cell.iloc[0], seeds) if len(cell) else ""
            if len(cell) and not math.isnan(cell.iloc[0].lr):
                row[f"n={size}"] += f" lr {_lr(cell.iloc[0].lr)}"
        row["wall s/run"] = _fmt(g.wall_time_s.mean())
        row[memory] = _fmt(g.peak_memory_mb.mean(), 0)
        packed = int(g.pack_size.max()) if "pack_size" in g else 1
        if packed > 1:  # one process trained the pack: its memory, not one run's
            row[memory] += f" (pack of {packed})"
        rows.append(row)
    return pd.DataFrame(rows)


def display_significance(sig: pd.DataFrame, best: pd.DataFrame, task: str) -> pd.DataFrame:
    """One row per method and size: its difference against the best trained method, full
    fine-tuning and the untuned model; significant ones (Holm) in bold."""
    rows = []
    groups = list(best[best.task == task].groupby(["task", "train_size"]))
    bests = {next((label for label, rs in reference_roles(g).items() if "best" in rs), None)
             for _, g in groups}
    # one column against the best trained method: named in its header when it is the same
    # for every training-set size, else each size's best is the row marked "— (best)"
    best_header = f"vs best ({next(iter(bests))})" if len(bests) == 1 and None not in bests \
        else "vs best trained of its n"
    for (t, size), g in groups:
        roles = reference_roles(g)
        by_role = {role: label for label, rs in roles.items() for role in rs}
        higher = bool(g.higher_is_better.iloc[0])
        for _, m in g.sort_values("test_mean", ascending=not higher).iterrows():
            row = {"n": size, "method": m.label, "test": _fmt(m.test_mean)}
            for role in ("best", "full", "untuned"):
                ref = by_role.get(role)
                header = best_header if role == "best" else f"vs {role}"
                if role != "best" and ref is not None and ref == by_role.get("best"):
                    row[header] = "= vs best"  # full fine-tuning is the best here
                    continue
                p = _pair(sig, t, size, m.label, ref) if ref and ref != m.label else None
                if p is None:
                    row[header] = "— (best)" if role == "best" and ref == m.label \
                        and len(bests) > 1 else "—"
                    continue
                text = f"{p.difference:+.1f} [{p.ci_low:+.1f}, {p.ci_high:+.1f}] p={p.p_holm:.2g}"
                row[header] = f"**{text}**" if p.significant else text
            rows.append(row)
    return pd.DataFrame(rows)


@dataclass
class StudyTables:
    """What the report is computed from: every run (`runs.csv`), the headline (`headline.csv`)
    and every comparison (`significance.csv`), as DataFrames."""

    runs: pd.DataFrame
    headline: pd.DataFrame
    significance: pd.DataFrame
    best: pd.DataFrame  # each method's best configuration per task and training-set size
    view: pd.DataFrame  # runs, with runs shared by every sample size repeated for each
    left_out: list[str]  # run folders not in the grid, or unreadable


def study_tables(study_dir: str | Path) -> StudyTables:
    """Read the run folders and compute the report's tables (nothing is written)."""
    study_dir = Path(study_dir)
    loaded, left_out = load_runs(study_dir)
    runs = select_learning_rates(loaded)
    view = expand_shared(runs)
    headline = headline_table(view)
    if headline.empty:
        failed = runs[runs.status == "failed"]
        first = f"; first error: {failed.error.iloc[0]}" if len(failed) else ""
        raise PeftlabError(f"{study_dir}: no completed run to report on "
                           f"({len(failed)} failed){first}")
    best = figures.best_configs(headline)
    sig = significance_table(study_dir, headline, best)
    return StudyTables(runs, headline, sig, best, view, left_out)


def write_report(study_dir: str | Path) -> dict[str, Path]:
    """Read the run folders; write tables (CSV), figures (PNG, SVG), report.md, report.html."""
    study_dir = Path(study_dir)
    t = study_tables(study_dir)
    runs, view, headline, best, sig, left_out = (t.runs, t.view, t.headline, t.best,
                                                 t.significance, t.left_out)
    missing = missing_runs(study_dir, runs)
    colors = figures.method_colors(list(runs.method_name.dropna()))
    out = study_dir / "report"
    fig_dir = out / "figures"
    sections: list[tuple[str, str, pd.DataFrame, pd.DataFrame, list[Path]]] = []
    for task in sorted(headline.task.unique()):
        sizes = train_sizes(runs, task)
        metric = headline[headline.task == task].metric.iloc[0]
        label, short = metric_label(metric), metric_label(metric, short=True)
        table = display_headline(headline, task, sizes)
        figs = [figures.learning_curves(study_dir, view, best, task, s, fig_dir, colors, short)
                for s in sizes]
        figs += [figures.efficiency(headline, task, s, fig_dir, colors, short) for s in sizes]
        figs.append(figures.data_scaling(best, task, fig_dir, colors, short))
        sections.append((task, label, table, display_significance(sig, best, task), figs))
    notes = findings(runs, best, sig, missing)
    if left_out:
        notes.append(f"{len(left_out)} run folders left out: " + "; ".join(left_out[:10]))

    out.mkdir(parents=True, exist_ok=True)
    runs.drop(columns=["error"]).to_csv(out / "runs.csv", index=False)
    headline.drop(columns=["keys", "run_seeds", "run_scores"]).to_csv(out / "headline.csv",
                                                                      index=False)
    sig.to_csv(out / "significance.csv", index=False)

    md = render_markdown(sections, runs, notes)
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.html", render_html(sections, runs, notes))
    return {"markdown": out / "report.md", "html": out / "report.html",
            "headline": out / "headline.csv", "runs": out / "runs.csv",
            "significance": out / "significance.csv", "figures": fig_dir}


INTRO = (
    "Test metrics are on a 0-100 scale: means ± standard deviation over seeds, with a 95% "
    "Student-t interval (clipped to 0-100; shown from 3 seeds up), for the learning rate "
    "chosen per method, size and training-set size by the best mean validation score (the "
    "test set was evaluated once per run, on the checkpoint chosen on validation). "
    "`trainable (inference)` counts what a method saves and adds at inference; `trained "
    "(training)` what the optimizer updated (prefix tuning's MLP reparameterisation trains "
    "more than the prefixes it folds into). `untuned` is the loaded instruction-tuned model "
    "at step 0, not a zero-shot model: Flan-T5 saw SST-2 and SAMSum in instruction tuning. "
    f"Differences between methods are tested with a {TEST_NAME}: it carries both the "
    "variation between seeds (training sample, initialisation, batch order) and the "
    "variation between test examples. Each method's best size is compared with the best "
    "trained method, full fine-tuning and the untuned model; p-values are Holm-adjusted "
    "within each task and training-set size; every pair of configurations is in "
    "significance.csv. With 2 seeds a comparison has about one degree of freedom and a wide "
    "interval (clipped to the -100..100 a difference of two 0-100 scores can take): run 3 or "
    "more. Runs trained in packs (`peftlab run --pack P`) show their share of the pack's wall "
    "time, and the pack's peak memory (marked): one process held the pack."
)

APPENDIX_COLUMNS = ["key", "status", "selected", "learning_rate", "seed", "val_score", "test_score",
                    "best_step", "step0_val", "final_val", "flag_loss_fell_metric_fell"]


def _appendix(runs: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in APPENDIX_COLUMNS if c in runs.columns]
    table = runs[cols].sort_values("key").copy()
    table["learning_rate"] = table.learning_rate.map(_lr)
    for c in ("val_score", "test_score", "step0_val", "final_val"):
        if c in table:
            table[c] = table[c].map(lambda v: "—" if pd.isna(v) else f"{v:.2f}")
    for c in ("seed", "best_step"):
        if c in table:
            table[c] = table[c].map(lambda v: "—" if pd.isna(v) else str(int(v)))
    return table


SIGNIFICANCE_NOTE = ("Difference (this method minus the reference) [95% CI, not adjusted for "
                     "the number of comparisons], Holm-adjusted p; **bold**: significant at "
                     "0.05 after adjustment. A CI that excludes 0 with a Holm-adjusted p above "
                     "0.05 is a difference the family of comparisons does not support.")


def render_markdown(sections, runs, notes) -> str:
    parts = ["# Study report", "", INTRO, "", "## Findings", ""]
    parts += [f"- {n}" for n in notes]
    for task, label, table, sig_table, figs in sections:
        parts += ["", f"## {task}: test {label}", "", _md_table(table), ""]
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


def render_html(sections, runs, notes) -> str:
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
             "img{max-width:100%;border:1px solid #eee}figure{margin:1em 0}")
    body = [f"<h1>Study report</h1><p>{html.escape(INTRO)}</p><h2>Findings</h2><ul>"]
    body += [f"<li>{html.escape(n)}</li>" for n in notes]
    body.append("</ul>")
    for task, label, table, sig_table, figs in sections:
        body.append(f"<h2>{html.escape(task)}: test {html.escape(label)}</h2>")
        body.append(_html_table(table))
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
