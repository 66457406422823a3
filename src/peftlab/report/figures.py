"""The report's figures (PNG for the HTML page, SVG for papers), from the run tables."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from peftlab.files import read_jsonl  # noqa: E402

REFERENCE_METHODS = ("untuned", "majority", "lead-3")


def _save(fig: plt.Figure, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    # bbox "tight": the legends sit outside the axes and must stay in the file
    png = folder / f"{name}.png"
    fig.savefig(png, dpi=130, bbox_inches="tight")
    fig.savefig(folder / f"{name}.svg", bbox_inches="tight")
    plt.close(fig)
    return png


def method_colors(names: list[str]) -> dict[str, str]:
    """One colour per method for the whole report (every task and figure): from the sorted
    names of all the study's methods, so a method keeps its colour across figures."""
    palette = list(plt.get_cmap("tab10").colors) + list(plt.get_cmap("Dark2").colors)
    return {n: matplotlib.colors.to_hex(palette[i % len(palette)])
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


def best_configs(headline: pd.DataFrame) -> pd.DataFrame:
    """Per (task, train size, method): the size with the best validation mean (selected rate)."""
    rows = []
    for _, g in headline.groupby(["task", "train_size", "method_name"], dropna=False):
        higher = bool(g.higher_is_better.iloc[0])
        rows.append(g.loc[g.val_mean.idxmax() if higher else g.val_mean.idxmin()])
    return pd.DataFrame(rows)


def learning_curves(study_dir: Path, runs: pd.DataFrame, best: pd.DataFrame, task: str,
                    size, out: Path, colors: dict[str, str], metric_label: str) -> Path:
    """Training loss and validation metric vs step: mean and +-std over seeds, step 0 shown."""
    chosen = best[(best.task == task) & (best.train_size == size)]
    metric = chosen.metric.iloc[0]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(12, 4))
    trained = chosen[~chosen.method_name.isin(REFERENCE_METHODS)]
    seeds = seeds_phrase(list(trained.seeds))
    for _, cfg in chosen.iterrows():
        keys = runs[(runs.task == task) & (runs.label == cfg.label) & runs.selected
                    & (runs.train_size == size)].key
        frames = [pd.DataFrame(read_jsonl(study_dir / k / "metrics.jsonl")) for k in keys]
        if not frames:
            continue
        color = colors[cfg.method_name]
        name = f"{cfg.label}" + ("" if cfg.method_name in REFERENCE_METHODS else f" (lr {cfg.lr:g})")
        for ax, column in ((ax_loss, "train_loss"), (ax_val, f"val_{metric}")):
            series = [f.set_index("step")[column].dropna() for f in frames if column in f]
            if not series or all(s.empty for s in series):
                continue
            table = pd.concat(series, axis=1)
            mean, std = table.mean(axis=1), table.std(axis=1).fillna(0)
            if len(table) == 1:  # untuned and baselines: one point at step 0, drawn as a level
                ax.axhline(mean.iloc[0], color=color, ls="--", lw=1, label=name)
                continue
            ax.plot(table.index, mean, color=color, label=name, marker="o", ms=3)
            ax.fill_between(table.index, mean - std, mean + std, color=color, alpha=0.15)
    ax_loss.set(xlabel="optimizer step", ylabel="training loss (token mean)",
                title="training loss")
    ax_val.set(xlabel="optimizer step (0 = untrained)", ylabel=f"validation {metric_label}",
               title=f"validation {metric_label}")
    fig.suptitle(f"{task}, {size} training examples: mean ± std over {seeds} (each method's "
                 "size and rate chosen on validation)")
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
    fig, ax = plt.subplots(figsize=(8, 4.5))
    trained = table[table.trainable_params > 0].sort_values("trainable_params")
    for name, g in trained.groupby("method_name"):
        ax.errorbar(g.trainable_params, g.test_mean, yerr=g.test_std.fillna(0), marker="o",
                    capsize=3, color=colors[name], label=name)
    for _, row in table[table.trainable_params == 0].iterrows():
        ax.axhline(row.test_mean, ls="--", lw=1, color=colors[row.method_name],
                   label=f"{row.label} (trains nothing)")
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
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, g in table[table.train_size != "all"].groupby("method_name"):
        g = g.sort_values("train_size", key=lambda s: s.map(position))
        x = [position[s] for s in g.train_size]
        style = "--" if name in REFERENCE_METHODS else "-"
        ax.errorbar(x, g.test_mean, yerr=g.test_std.fillna(0), marker="o", capsize=3, ls=style,
                    color=colors[name], label=name)
    ax.set_xticks(range(len(sizes)), [str(s) for s in sizes])
    trained = table[~table.method_name.isin(REFERENCE_METHODS)]
    ax.set(xlabel="training examples", ylabel=f"test {metric_label}",
           title=f"{task}: test {metric_label} (mean ± std over {seeds_phrase(list(trained.seeds))}) "
                 "vs training examples;\neach method's size and rate chosen on validation")
    _legend_outside(ax)
    return _save(fig, out, f"scaling-{task}")


def is_nonempty_image(path: Path) -> bool:
    data = plt.imread(path)
    return data.size > 0 and float(np.std(data)) > 0
