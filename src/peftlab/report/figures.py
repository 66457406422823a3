"""The report's figures (PNG for the HTML page, SVG for papers), from the run tables."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from peftlab.files import read_jsonl
from peftlab.report.select import reference_methods

if TYPE_CHECKING:
    import matplotlib.pyplot as plt

def _pyplot() -> ModuleType:
    """matplotlib's pyplot, drawing to files only. Imported when a figure is drawn: importing
    matplotlib writes its font cache and config folder under HOME, and a run, or a program
    that reads the report's tables, must write nowhere it was not given."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot

    return matplotlib.pyplot


def _save(fig: plt.Figure, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    # bbox "tight": the legends sit outside the axes and must stay in the file
    png = folder / f"{name}.png"
    fig.savefig(png, dpi=130, bbox_inches="tight")
    fig.savefig(folder / f"{name}.svg", bbox_inches="tight")
    _pyplot().close(fig)
    return png


def method_colors(names: list[str]) -> dict[str, str]:
    """One colour per method for the whole report (every task and figure): from the sorted
    names of all the study's methods, so a method keeps its colour across figures."""
    plt = _pyplot()
    from matplotlib.colors import to_hex  # after _pyplot: see there

    palette = list(plt.get_cmap("tab10").colors) + list(plt.get_cmap("Dark2").colors)
    return {n: to_hex(palette[i % len(palette)])
            for i, n in enumerate(sorted(set(names)))}


def _legend_outside(ax: plt.Axes) -> None:
    """Right of the axes: a legend inside covered points and error bars."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def seeds_phrase(counts: list[int]) -> str:
    """'3 seeds', or '2-3 seeds' where some runs failed or diverged."""
    counts = [int(c) for c in counts if c]
    if not counts:
        return "0 seeds"
    low, high = min(counts), max(counts)
    return f"{high} seed{'s' if high > 1 else ''}" if low == high else f"{low}-{high} seeds"


def _coincident(drawn: list[tuple[str, np.ndarray, np.ndarray]], name: str, x, y) -> str:
    """' (same values as X)' when (x, y) repeats a series already drawn on the axes, which
    would hide under it; the series is recorded either way."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    same = [n for n, x2, y2 in drawn if len(x2) == len(x) and np.allclose(x2, x, equal_nan=True)
            and np.allclose(y2, y, equal_nan=True, rtol=0, atol=1e-9)]
    drawn.append((name, x, y))
    return f" (same values as {', '.join(same)})" if same else ""


def learning_curves(study_dir: Path, best: pd.DataFrame, task: str, size, out: Path,
                    colors: dict[str, str], metric_label: str) -> Path:
    """Training loss and validation metric vs step of each method's reported runs: mean and
    +-std over seeds, step 0 (the untrained model) shown."""
    chosen = best[(best.task == task) & (best.train_size == size)]
    metric = chosen.metric.iloc[0]
    fig, (ax_loss, ax_val) = _pyplot().subplots(1, 2, figsize=(12, 4), sharex=True)
    references = reference_methods(chosen)
    trained = chosen[~chosen.method_name.isin(references)]
    seeds = seeds_phrase(list(trained.seeds))
    drawn: dict[str, list] = {"train_loss": [], f"val_{metric}": []}
    first_loss_step = None
    for _, cfg in chosen.iterrows():
        frames = [pd.DataFrame(read_jsonl(study_dir / k / "metrics.jsonl")) for k in cfg["keys"]]
        if not frames:
            continue
        color = colors[cfg.method_name]
        name = f"{cfg.label}" + ("" if cfg.method_name in references
                                 else f" (lr {cfg.lrs})")
        for ax, column in ((ax_loss, "train_loss"), (ax_val, f"val_{metric}")):
            series = [f.set_index("step")[column].dropna() for f in frames if column in f]
            if not series or all(s.empty for s in series):
                continue
            table = pd.concat(series, axis=1)
            mean, std = table.mean(axis=1), table.std(axis=1).fillna(0)
            if column == "train_loss" and len(mean):
                first = int(mean.index.min())
                first_loss_step = first if first_loss_step is None else min(first_loss_step, first)
            label = name + _coincident(drawn[column], cfg.label, mean.index, mean)
            if len(table) == 1:  # untuned and baselines: one point at step 0, drawn as a level
                ax.axhline(mean.iloc[0], color=color, ls="--", lw=1, label=label)
                continue
            ax.plot(table.index, mean, color=color, label=label, marker="o", ms=3)
            ax.fill_between(table.index, mean - std, mean + std, color=color, alpha=0.15)
    loss_title = "training loss" + (f" (first logged at step {first_loss_step})"
                                    if first_loss_step else "")
    ax_loss.set(xlabel="optimizer step", ylabel="training loss (token mean)", title=loss_title)
    ax_val.set(xlabel="optimizer step (0 = untrained)", ylabel=f"validation {metric_label}",
               title=f"validation {metric_label}")
    ax_loss.set_xlim(left=0)
    fig.suptitle(f"{task}, {size} training examples: mean ± std over {seeds} of each method's "
                 "reported runs (size and rate chosen on validation)")
    _legend_outside(ax_val)
    return _save(fig, out, f"curves-{task}-n{size}")


def pareto_front(points: list[tuple[float, float]], higher: bool) -> list[int]:
    """Indices of points that no other point beats with fewer-or-equal parameters."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 <= x and (y2 > y if higher else y2 < y)) or (x2 < x and y2 == y)
            for j, (x2, y2) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return front


def efficiency(headline: pd.DataFrame, task: str, size, out: Path, colors: dict[str, str],
               metric_label: str) -> Path:
    """Trainable parameters (log) vs test metric: one curve per method across its size knob."""
    table = headline[(headline.task == task) & (headline.train_size == size)]
    higher = bool(table.higher_is_better.iloc[0])
    fig, ax = _pyplot().subplots(figsize=(8, 4.5))
    trained = table[table.trainable_params > 0].sort_values("trainable_params")
    drawn: list = []
    for name, g in trained.groupby("method_name"):
        ax.errorbar(g.trainable_params, g.test_mean, yerr=g.test_std.fillna(0), marker="o",
                    capsize=3, color=colors[name],
                    label=name + _coincident(drawn, name, g.trainable_params, g.test_mean))
    levels: list = []
    for _, row in table[table.trainable_params == 0].iterrows():
        same = _coincident(levels, row.label, [0], [row.test_mean])
        ax.axhline(row.test_mean, ls="--", lw=1, color=colors[row.method_name],
                   label=f"{row.label} (trains nothing){same}")
    pts = list(zip(trained.trainable_params, trained.test_mean))
    front = [pts[i] for i in pareto_front(pts, higher)]
    if front:
        fx, fy = zip(*sorted(front))
        ax.plot(fx, fy, color="black", lw=0.8, ls=":", label="Pareto front")
        ax.scatter(fx, fy, s=120, facecolors="none", edgecolors="black", zorder=5)
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters at inference (what is saved; log scale)",
           ylabel=f"test {metric_label}",
           title=f"{task}, {size} training examples: test {metric_label} (mean ± std over "
                 f"{seeds_phrase(list(trained.seeds))}) vs parameters")
    _legend_outside(ax)
    return _save(fig, out, f"efficiency-{task}-n{size}")


def data_scaling(best: pd.DataFrame, task: str, out: Path, colors: dict[str, str],
                 metric_label: str) -> Path:
    """Test metric vs training-set size for each method's best configuration."""
    table = best[best.task == task]
    sizes = sorted({s for s in table.train_size if s != "all"})
    position = {s: i for i, s in enumerate(sizes)}
    references = reference_methods(table)
    fig, ax = _pyplot().subplots(figsize=(8, 4.5))
    drawn: list = []
    for name, g in table[table.train_size != "all"].groupby("method_name"):
        g = g.sort_values("train_size", key=lambda s: s.map(position))
        x = [position[s] for s in g.train_size]
        style = "--" if name in references else "-"
        ax.errorbar(x, g.test_mean, yerr=g.test_std.fillna(0), marker="o", capsize=3, ls=style,
                    color=colors[name], label=name + _coincident(drawn, name, x, g.test_mean))
    ax.set_xticks(range(len(sizes)), [str(s) for s in sizes])
    trained = table[~table.method_name.isin(references)]
    ax.set(xlabel="training examples", ylabel=f"test {metric_label}",
           title=f"{task}: test {metric_label} (mean ± std over {seeds_phrase(list(trained.seeds))}) "
                 "vs training examples;\neach method's size and rate chosen on validation")
    _legend_outside(ax)
    return _save(fig, out, f"scaling-{task}")


def expected_search(expected: pd.DataFrame, best: pd.DataFrame, task: str, size, out: Path,
                    colors: dict[str, str], metric_label: str) -> Path:
    """Expected best validation score after n configurations tried at random, and the test
    score of that choice, per trained method (report.select.expected_best)."""
    table = expected[(expected.task == task) & (expected.train_size == size)]
    fig, (ax_val, ax_test) = _pyplot().subplots(1, 2, figsize=(12, 4), sharex=True)
    drawn: dict[str, list] = {"val": [], "test": []}
    for name, g in table.groupby("method_name"):
        g = g.sort_values("configurations")
        for ax, column, key in ((ax_val, "expected_best_val", "val"),
                                (ax_test, "expected_test", "test")):
            ax.plot(g.configurations, g[column], marker="o", ms=3, color=colors[name],
                    label=f"{name} ({int(g['of'].max())} searched)"
                    + _coincident(drawn[key], name, g.configurations, g[column]))
    selection_metric = best[(best.task == task)].metric.iloc[0]
    ax_val.set(xlabel="configurations tried (size x learning rate)",
               ylabel=f"expected best validation {metric_label}"
               if selection_metric != "loss" else "expected best validation loss",
               title="expected best validation score")
    ax_test.set(xlabel="configurations tried (size x learning rate)",
                ylabel=f"expected test {metric_label}", title="test score of that choice")
    ax_val.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"{task}, {size} training examples: expected score of a random search of n "
                 "configurations (seed means; Dodge et al. 2019, Tang et al. 2020)")
    _legend_outside(ax_test)
    return _save(fig, out, f"search-{task}-n{size}")


def is_nonempty_image(path: Path) -> bool:
    data = _pyplot().imread(path)
    return data.size > 0 and float(np.std(data)) > 0
