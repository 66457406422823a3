"""`peftlab report STUDY_DIR`: tables, figures, statistics and findings from run folders only."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

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
from peftlab.report.render import (
    EDGE_MARK,
    STEP0_MARK,
    introduction,
    render_html,
    render_markdown,
)
from peftlab.report.select import (
    DEFAULT_SELECTION,
    SELECTIONS,
    best_configs,
    expected_best,
    headline_table,
    reference_methods,
    top_trained,
)
from peftlab.report.stats import MIN_SEEDS, POWER, Comparison, crossed_test, holm, untested

METRIC_LABELS = {
    "accuracy": "accuracy (%)",
    "generation_exact_match": "exact match of free generation (%)",
    "rouge1": "ROUGE-1 F1 (0-100)", "rouge2": "ROUGE-2 F1 (0-100)",
    "rougeL": "ROUGE-L F1 (sentence-level, 0-100)",
    "rougeLsum": "ROUGE-Lsum F1 (summary-level, the papers' R-L, 0-100)",
    "loss": "loss",
}


SHORT_LABELS = {"accuracy": "accuracy (%)", "generation_exact_match": "exact match (%)",
                "rougeLsum": "ROUGE-Lsum F1 (0-100)", "rougeL": "ROUGE-L F1 (0-100)",
                "rouge1": "ROUGE-1 F1 (0-100)", "rouge2": "ROUGE-2 F1 (0-100)"}


def metric_label(metric: str, short: bool = False) -> str:
    """How tables (long) and figures (short) name a metric."""
    return (SHORT_LABELS if short else METRIC_LABELS).get(metric, metric)


def reference_roles(best: pd.DataFrame) -> dict[str, list[str]]:
    """label -> roles: the configurations every method is compared against in the report (the
    best trained method is chosen on validation)."""
    roles: dict[str, list[str]] = {}
    ranked = top_trained(best, reference_methods(best))
    if len(ranked):
        roles.setdefault(ranked.iloc[0].label, []).append("best")
    for name in ("full", "untuned"):
        rows = best[best.method_name == name]
        if len(rows):
            roles.setdefault(rows.iloc[0].label, []).append(name)
    return roles


def compare(a: dict, a_seedless: bool, b: dict, b_seedless: bool) -> Comparison:
    """The crossed test between two configurations, paired by seed and test example.

    A configuration that depends on no seed (untuned, lead-3) is the same run for every seed
    of the other. Two that both depend on it are paired on the seeds they share (the same seed
    draws the same training sample). Below MIN_SEEDS seeds the seed variance is too poorly
    known for a test (with 2 seeds, one degree of freedom): the difference is given, untested.
    """
    if a_seedless and b_seedless:
        pairs = [(next(iter(a.values())), next(iter(b.values())))]
    elif a_seedless:
        pairs = [(next(iter(a.values())), b[s]) for s in sorted(b)]
    elif b_seedless:
        pairs = [(a[s], next(iter(b.values()))) for s in sorted(a)]
    else:
        pairs = [(a[s], b[s]) for s in sorted(set(a) & set(b))]
    if not pairs:
        return untested(math.nan, 0, 0)
    ids = sorted(set.intersection(*(set(x) & set(y) for x, y in pairs)))
    d = np.array([[x[i] - y[i] for i in ids] for x, y in pairs])
    if len(pairs) < MIN_SEEDS and not (a_seedless and b_seedless):
        return untested(float(d.mean()) if d.size else math.nan, len(pairs), len(ids))
    return crossed_test(d)


class _Scores:
    """{seed: {example id: score}} per reported configuration, each run's file read once."""

    def __init__(self, study_dir: Path):
        self.study_dir, self.cache = study_dir, {}

    def __call__(self, row: pd.Series) -> dict[Any, dict[str, float]]:
        out = {}
        for key, seed, score in zip(row["keys"], row["run_seeds"], row["run_scores"]):
            if key not in self.cache:
                self.cache[key] = example_scores(self.study_dir, key, row.metric, score)
            out[seed] = self.cache[key]
        return out


def _comparison_row(scores: _Scores, a: pd.Series, b: pd.Series, roles: list[str]) -> dict:
    c = compare(scores(a), a.seedless, scores(b), b.seedless)
    if a.metric != "loss":  # two 0-100 scores differ by -100..100
        c = replace(c, ci_low=max(c.ci_low, -100.0), ci_high=min(c.ci_high, 100.0))
    return {"task": a.task, "train_size": a.train_size, "a": a.label, "b": b.label,
            "b_role": ", ".join(roles), "shown": bool(roles), "metric": a.metric,
            "difference": c.difference, "ci_low": c.ci_low, "ci_high": c.ci_high,
            "p_value": c.p_value, "df": c.df, "seeds": c.seeds, "examples": c.examples,
            "detectable": c.detectable}


def significance_table(study_dir: Path, headline: pd.DataFrame, best: pd.DataFrame
                       ) -> pd.DataFrame:
    """Per task and size, two families of the crossed test. `shown`: each method's reported
    configuration against the best trained method (chosen on validation), full fine-tuning
    and the untuned model, Holm-adjusted within that family (`p_holm`); the report's claims
    come from it. Not shown: every pair of configurations (method x size), Holm-adjusted over
    all of them (`p_holm_all_pairs`)."""
    rows = []
    scores = _Scores(study_dir)
    for (task, size), variants in headline.groupby(["task", "train_size"]):
        chosen = best[(best.task == task) & (best.train_size == size)]
        by_label = {r.label: r for _, r in chosen.iterrows()}
        roles = reference_roles(chosen)
        shown: dict[tuple[str, str], list[str]] = {}
        for method in chosen.label:
            for ref, ref_roles in roles.items():
                if method != ref and (ref, method) not in shown:
                    shown[(method, ref)] = ref_roles
        family = [_comparison_row(scores, by_label[a], by_label[b], r)
                  for (a, b), r in shown.items()]
        for row, adjusted in zip(family, holm([r["p_value"] for r in family])):
            row.update(p_holm=adjusted, p_holm_all_pairs=math.nan,
                       significant=bool(adjusted < 0.05))
        configs = {r.label: r for _, r in variants.iterrows()}
        pairs = [_comparison_row(scores, configs[a], configs[b], [])
                 for a, b in itertools.combinations(sorted(variants.label), 2)]
        for row, adjusted in zip(pairs, holm([r["p_value"] for r in pairs])):
            row.update(p_holm=math.nan, p_holm_all_pairs=adjusted, significant=None)
        rows += family + pairs
    return pd.DataFrame(rows)


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def _cell(row: pd.Series, seeds: int) -> str:
    if row.seedless:  # one run that no seed changes (untuned, lead-3): no spread to show
        return f"{_fmt(row.test_mean)} (one run)"
    text = f"{_fmt(row.test_mean)} ± {_fmt(row.test_std)}"
    if not math.isnan(row.ci_low):
        text += f" [{_fmt(row.ci_low)}, {_fmt(row.ci_high)}]"
    if row.seeds != seeds:
        text += f" ({row.seeds} seeds)"
    if row.lrs != "—":
        text += f" lr {row.lrs}" + (EDGE_MARK if row.rate_at_edge else "")
    if row.best_step0 and row.lrs != "—":  # a trained configuration that chose step 0
        text += f" {STEP0_MARK}{row.best_step0}/{row.seeds}"
    return text


def _verdict(p: pd.Series) -> str:
    if math.isnan(p.p_holm):
        return f"not tested ({p.seeds} seed{'s' if p.seeds != 1 else ''})"
    if not p.significant:
        return "not significant"
    return "significantly higher" if p.difference > 0 else "significantly lower"


def _difference(p: pd.Series) -> str:
    if math.isnan(p.p_holm):
        return f"{p.difference:+.1f}, {_verdict(p)}"
    return (f"{p.difference:+.1f} (95% CI [{p.ci_low:+.1f}, {p.ci_high:+.1f}], unadjusted; "
            f"Holm-adjusted p = {p.p_holm:.2g}, {_verdict(p)}; smallest difference detectable "
            f"at {POWER:.0%} power: {p.detectable:.1f})")


def _pair(sig: pd.DataFrame, task: str, size: Any, a: str, b: str) -> pd.Series | None:
    """The shown comparison of a against b, oriented a - b."""
    rows = sig[(sig.task == task) & (sig.train_size == size) & sig.shown.astype(bool)]
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


def _chosen_how(top: pd.Series, view: pd.DataFrame, selection: str) -> str:
    """What was chosen on validation for a method's reported configuration, and only that."""
    runs = view[(view.task == top.task) & (view.train_size == top.train_size)
                & (view.method_name == top.method_name)]
    sizes, rates = runs.label.nunique(), runs.learning_rate.nunique()
    chosen = [f"its size (of {sizes})"] if sizes > 1 else []
    if rates > 1:
        chosen.append(f"its learning rate ({top.lrs}, of {rates})")
    if not chosen:
        return f"one configuration, learning rate {top.lrs}: nothing chosen"
    how = ("for each seed on the other seeds' validation (cross-fit)"
           if selection == "cross-fit" and top.seeds > 1 else "on validation")
    return f"{' and '.join(chosen)} chosen {how}"


def findings(runs: pd.DataFrame, best: pd.DataFrame, sig: pd.DataFrame,
             missing: list[str], view: pd.DataFrame | None = None,
             selection: str = DEFAULT_SELECTION) -> list[str]:
    """Sentences generated from the numbers, about this study only; each claim of a
    difference comes from the shown family of tests (crossed test, Holm-adjusted)."""
    view = runs if view is None else view
    out = []
    for (task, size), g in best.groupby(["task", "train_size"]):
        ranked = top_trained(g, reference_methods(g))
        if ranked.empty:
            continue
        top = ranked.iloc[0]
        metric = metric_label(top.metric)
        text = (f"{task}, {size} training examples: the best trained method, chosen by its "
                f"validation score, is {top.label}: test {metric} {_fmt(top.test_mean)} ± "
                f"{_fmt(top.test_std)} "
                f"over {top.seeds} seeds ({_chosen_how(top, view, selection)}).")
        higher = bool(top.higher_is_better)
        refs = g[g.method_name.isin(reference_methods(g))].sort_values(
            "test_mean", ascending=not higher)
        phrases, not_above = [], []
        for _, ref in refs.iterrows():
            p = _pair(sig, task, size, top.label, ref.label)
            if p is None:
                continue
            phrases.append(f"{ref.label} ({_fmt(ref.test_mean)}): {_difference(p)}")
            if not (p.significant is True and (p.difference > 0) == higher):
                not_above.append(ref.label)
        if phrases:
            text += " Against the untuned model and the baselines: " + "; ".join(phrases) + "."
        if not_above:
            text += (f" So {top.label}, the best trained method, is not shown to be better than "
                     f"{' or '.join(not_above)} here.")
        if len(ranked) > 1:
            second = ranked.iloc[1]
            p = _pair(sig, task, size, second.label, top.label)
            if p is not None:
                text += (f" Runner-up by validation {second.label} "
                         f"({_fmt(second.test_mean)}) against {top.label}: {_difference(p)}.")
        out.append(text)
        untuned = g[g.method_name == "untuned"]
        if not untuned.empty:
            level = untuned.iloc[0]
            hurt = []
            for _, r in g[~g.method_name.isin(reference_methods(g))].iterrows():
                p = _pair(sig, task, size, r.label, level.label)
                if p is not None and p.significant is True and (p.difference < 0) == higher:
                    hurt.append(f"{r.label} ({p.difference:+.1f})")
            if hurt:
                out.append(f"{task}, {size} examples: significantly below the untuned model "
                           f"({_fmt(level.test_mean)}) after training: {', '.join(hurt)}.")
    trained = best[~best.method_name.isin(reference_methods(best))]
    step0 = trained[trained.best_step0 > 0]
    if len(step0):
        names = ", ".join(f"{r.task} {r.label} n={r.train_size} ({r.best_step0}/{r.seeds})"
                          for r in step0.itertuples())
        out.append(f"{len(step0)} of {len(trained)} reported trained configurations report "
                   f"a step-0 checkpoint for some seeds (validation chose the untrained model; "
                   f"{STEP0_MARK} in the tables): {names}.")
    edge = trained[trained.rate_at_edge]
    if len(edge):
        two = " (with two candidates every choice is an edge)" \
            if (view[view.method_name.isin(edge.method_name)].groupby(
                ["task", "label", "train_size"]).learning_rate.nunique() <= 2).all() else ""
        out.append(f"{len(edge)} of {len(trained)} reported trained configurations use the "
                   f"smallest or largest learning-rate candidate ({EDGE_MARK} in the tables)"
                   f"{two}: the best rate may lie outside the grid.")
    flags = runs.get("flag_loss_fell_metric_fell")
    flagged = runs[flags.fillna(False).astype(bool)] if flags is not None else runs.iloc[:0]
    if len(flagged):
        keys = ", ".join(flagged.key.head(12)) + (" ..." if len(flagged) > 12 else "")
        out.append(f"{len(flagged)} of {len(runs)} runs ended with a validation metric below "
                   f"their untrained (step-0) value while their training loss fell: {keys}.")
    else:
        out.append("No run ended with its validation metric below its step-0 value while its "
                   "training loss fell.")
    nan_test = runs[(runs.status == "completed") & runs.metric.notna()
                    & ~np.isfinite(runs.test_score.astype(float))]
    if len(nan_test):
        out.append(f"{len(nan_test)} completed runs have no finite test score and count no "
                   f"seed: {', '.join(nan_test.key.head(12))}.")
    for status in ("diverged", "failed"):
        bad = runs[runs.status == status]
        if len(bad):
            out.append(f"{len(bad)} runs {status}: {', '.join(bad.key.head(12))}.")
    if missing:
        out.append(f"{len(missing)} runs of the grid have no result yet (the study is "
                   "unfinished): the tables use the finished ones.")
    return out


def _memory_column(kinds: pd.Series) -> str:
    known = sorted(set(kinds))
    return KIND_LABELS.get(known[0], "peak MB") if len(known) == 1 else "peak MB (mixed kinds)"


def display_headline(headline: pd.DataFrame, task: str, sizes: list) -> pd.DataFrame:
    t = headline[headline.task == task]
    seeds = int(t[~t.seedless].seeds.max()) if (~t.seedless).any() else 1
    rows = []
    references = reference_methods(t)
    order = sorted(t.label.unique(), key=lambda lab: (
        t[t.label == lab].method_name.iloc[0] not in references,
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
                               "% of total": f"{first.trainable_percent:.3g}",
                               "rates tried": int(g.configs.max()) if g.lrs.ne("—").any()
                               else "—"}
        for size in sizes:
            cell = g[g.train_size == size]
            row[f"n={size}"] = _cell(cell.iloc[0], seeds) if len(cell) else ""
        row["wall s/run"] = _fmt(g.wall_time_s.mean())
        row[memory] = _fmt(g.peak_memory_mb.mean(), 0)
        packed = int(g.pack_size.max()) if "pack_size" in g else 1
        if packed > 1:  # one process trained the pack: its memory, not one run's
            row[memory] += f" (pack of {packed})"
        rows.append(row)
    return pd.DataFrame(rows)


def _comparison_text(p: pd.Series) -> str:
    if math.isnan(p.p_holm):
        return f"{p.difference:+.1f}, {_verdict(p).replace(' (', ': ').rstrip(')')}"
    text = (f"{p.difference:+.1f} [{p.ci_low:+.1f}, {p.ci_high:+.1f}] p={p.p_holm:.2g}, "
            f"detects ±{p.detectable:.1f}")
    return f"**{text}**" if p.significant is True else text


def display_significance(sig: pd.DataFrame, best: pd.DataFrame, task: str) -> pd.DataFrame:
    """One row per method and size: the configurations it searched, and its difference
    against the best trained method, full fine-tuning and the untuned model; significant
    ones (Holm) in bold."""
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
            row = {"n": size, "method": m.label, "configs searched": int(m.configs),
                   "test": _fmt(m.test_mean)}
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
                row[header] = _comparison_text(p)
            rows.append(row)
    return pd.DataFrame(rows)


@dataclass
class StudyTables:
    """What the report is computed from: every run (`runs.csv`), the headline (`headline.csv`),
    every comparison (`significance.csv`) and the expected best score of a search
    (`expected_validation.csv`), as DataFrames."""

    runs: pd.DataFrame
    headline: pd.DataFrame
    significance: pd.DataFrame
    best: pd.DataFrame  # each method's reported configuration per task and training-set size
    view: pd.DataFrame  # runs, with runs shared by every sample size repeated for each
    left_out: list[str]  # run folders not in the grid, or unreadable
    expected: pd.DataFrame  # expected best validation (and its test) vs configurations tried
    selection: str


def study_selection(study_dir: Path, selection: str | None = None) -> str:
    """The selection rule: the argument, else the study file's `selection:`, else the default."""
    if selection is None:
        path = study_dir / "study.yaml"
        try:
            raw = yaml.safe_load(path.read_text()) if path.is_file() else None
        except (OSError, yaml.YAMLError) as e:
            raise PeftlabError(f"{path}: unreadable ({e})") from None
        selection = (raw or {}).get("selection", DEFAULT_SELECTION) \
            if isinstance(raw, dict) else DEFAULT_SELECTION
    if selection not in SELECTIONS:
        raise PeftlabError(f"selection {selection!r} is not one of {', '.join(SELECTIONS)}")
    return str(selection)


def study_tables(study_dir: str | Path, selection: str | None = None) -> StudyTables:
    """Read the run folders and compute the report's tables (nothing is written)."""
    study_dir = Path(study_dir)
    selection = study_selection(study_dir, selection)
    loaded, left_out = load_runs(study_dir)
    runs = select_learning_rates(loaded, selection)
    view = expand_shared(runs)
    headline = headline_table(view)
    if headline.empty:
        failed = runs[runs.status == "failed"]
        first = f"; first error: {failed.error.iloc[0]}" if len(failed) else ""
        raise PeftlabError(f"{study_dir}: no completed run to report on "
                           f"({len(failed)} failed){first}")
    best = best_configs(view, selection)
    sig = significance_table(study_dir, headline, best)
    expected = expected_best(view, reference_methods(view))
    return StudyTables(runs, headline, sig, best, view, left_out, expected, selection)


def write_report(study_dir: str | Path, selection: str | None = None) -> dict[str, Path]:
    """Read the run folders; write tables (CSV), figures (PNG, SVG), report.md, report.html."""
    study_dir = Path(study_dir)
    t = study_tables(study_dir, selection)
    runs, view, headline, best, sig = t.runs, t.view, t.headline, t.best, t.significance
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
        figs = [figures.learning_curves(study_dir, best, task, s, fig_dir, colors, short)
                for s in sizes]
        figs += [figures.efficiency(headline, task, s, fig_dir, colors, short) for s in sizes]
        figs.append(figures.data_scaling(best, task, fig_dir, colors, short))
        figs += [figures.expected_search(t.expected, best, task, s, fig_dir, colors, short)
                 for s in sizes if len(t.expected[(t.expected.task == task)
                                                  & (t.expected.train_size == s)])]
        sections.append((task, label, table, display_significance(sig, best, task), figs))
    found = findings(runs, best, sig, missing, view, t.selection)
    if t.left_out:
        found.append(f"{len(t.left_out)} run folders left out: " + "; ".join(t.left_out[:10]))

    out.mkdir(parents=True, exist_ok=True)
    runs.drop(columns=["error"]).to_csv(out / "runs.csv", index=False)
    headline.drop(columns=["keys", "run_seeds", "run_scores"]).to_csv(out / "headline.csv",
                                                                      index=False)
    best.drop(columns=["keys", "run_seeds", "run_scores"]).to_csv(out / "methods.csv",
                                                                  index=False)
    sig.to_csv(out / "significance.csv", index=False)
    t.expected.to_csv(out / "expected_validation.csv", index=False)

    intro = introduction(runs, t.selection)
    atomic_write_text(out / "report.md", render_markdown(intro, sections, runs, found))
    atomic_write_text(out / "report.html", render_html(intro, sections, runs, found))
    return {"markdown": out / "report.md", "html": out / "report.html",
            "headline": out / "headline.csv", "methods": out / "methods.csv",
            "runs": out / "runs.csv", "significance": out / "significance.csv",
            "expected": out / "expected_validation.csv", "figures": fig_dir}
