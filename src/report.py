"""The plots a person looks at, and the prediction report: strategy comparison and per-class table.

Only this module draws (matplotlib, headless). The prediction report goes under ``run.dir/report/``; the
label-embedding plots next to the fold that fitted the embedding. Column names and titles follow the
configured metric (its ``label`` and ``title``, src.metrics): ``oof_macro_f1_in_sample`` for HPA,
``oof_f2_samples_in_sample`` for Inclusive Images. With thousands of classes the per-class plots and the
per-class table of report.md show the most frequent classes only; ``per_class.csv`` keeps every class. The
strategy applied to test is marked in the tables and the strategies plot, with the reason it was chosen
(``auto``: the best cross-fold estimate).

This module draws; src.files writes. Each plot function draws a PNG to exactly the path it is given, whatever its
suffix: a temp name of :func:`src.files.write_atomic` or :class:`src.files.Staging`, which put it in place whole.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from src.config import MetricConfig
from src.files import Staging
from src.metrics import (  # noqa: E402
    Metric,
    count_labels,
    f1_curves,
    get_metric,
    ranked_top,
)

MAX_CLASSES_PLOTTED = 28  # many-label sets: the most frequent classes only
MAX_CLASSES_LISTED = 50  # rows of the per-class table in report.md (and in W&B); per_class.csv has all


def metric_columns(metric: MetricConfig | Metric | None, rows: str = "oof") -> tuple[str, str]:
    """A table's two score columns on ``rows`` (oof or holdout): (in-sample, cross-fold), e.g.
    oof_macro_f1_in_sample."""
    label = get_metric(metric).label
    return f"{rows}_{label}_in_sample", f"{rows}_{label}_cross_fold"


def strategy_table(results: dict[str, dict], chosen: str, metric: MetricConfig | Metric | None = None,
                   holdout: dict[str, dict] | None = None) -> pd.DataFrame:
    """One row per strategy: the metric in-sample and cross-fold (on OOF; with ``holdout``, the holdout's beside
    it), labels per image, the decision in words (the one applied: the holdout's when there is one)."""
    in_sample, cross_fold = metric_columns(metric)
    rows = [{"strategy": name, in_sample: r["in_sample"], cross_fold: r["cross_fold"],
             "labels_per_image": r["labels_per_image"], "decision": r["decision"].describe(),
             "chosen": "<-" if name == chosen else ""} for name, r in results.items()]
    frame = pd.DataFrame(rows)
    if holdout is not None:
        for at, (column, key) in enumerate(zip(metric_columns(metric, "holdout"), ("in_sample", "cross_fold"))):
            frame.insert(3 + at, column, [holdout[name][key] for name in frame["strategy"]])
        frame["decision"] = [holdout[name]["decision"].describe() for name in frame["strategy"]]
    return frame


def ensemble_table(blends: dict[str, dict], chosen: str, rows: str, metric: MetricConfig | Metric | None = None,
                   ) -> pd.DataFrame:
    """One row per way of combining the runs (src.ensemble.compare_blends): the metric in-sample and cross-fold
    on the ``rows`` they were fitted on (oof or holdout), the weights in words, the one applied."""
    in_sample, cross_fold = metric_columns(metric, rows)
    return pd.DataFrame([{"ensemble": name, in_sample: r["in_sample"], cross_fold: r["cross_fold"],
                          "blend": r["blend"].describe(), "chosen": "<-" if name == chosen else ""}
                         for name, r in blends.items()])


def class_table(results: dict[str, dict], chosen: str, support: np.ndarray, train_rate: np.ndarray,
                test_rate: np.ndarray) -> pd.DataFrame:
    """One row per class (all of them): support, the chosen strategy's threshold (NaN for top_k), F1 and
    predicted rates, and every other strategy's F1."""
    r = results[chosen]
    frame = pd.DataFrame({"class": np.arange(len(support)), "support": support, "threshold": r["thresholds"],
                          "f1": r["per_class_f1"], "true_rate": train_rate, "oof_pred_rate": r["predicted_rate"],
                          "test_pred_rate": test_rate})
    for name, other in results.items():
        if name != chosen:
            frame[f"f1_{name}"] = other["per_class_f1"]
    return frame


def _most_frequent(support: np.ndarray, limit: int) -> np.ndarray:
    """All classes when there are at most ``limit``, else the ``limit`` with the most OOF positives, in
    class order."""
    if len(support) <= limit:
        return np.arange(len(support))
    return np.sort(ranked_top(np.asarray(support)[None, :], limit)[0])  # ties: the lower class


def listed_classes(classes: pd.DataFrame) -> pd.DataFrame:
    """The rows of the per-class table worth printing: all, or the MAX_CLASSES_LISTED most frequent."""
    return classes.iloc[_most_frequent(classes["support"].to_numpy(), MAX_CLASSES_LISTED)]


def _plotted_classes(support: np.ndarray) -> np.ndarray:
    return _most_frequent(support, MAX_CLASSES_PLOTTED)


def plot_per_class_f1(results: dict[str, dict], support: np.ndarray, path: Path,
                      metric: MetricConfig | Metric | None = None) -> Path:
    """Grouped bars: OOF F1 of each class under each strategy, support under the class number; the legend
    gives each strategy's score by the configured metric."""
    metric = get_metric(metric)
    classes = _plotted_classes(support)
    names = list(results)
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(10, 0.55 * len(classes)), 4.5))
    for i, name in enumerate(names):
        ax.bar(np.arange(len(classes)) + i * width, results[name]["per_class_f1"][classes], width,
               label=f"{name} ({metric.title} {results[name]['in_sample']:.3f})")
    ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2,
                  [f"{c}\n{int(support[c])}" for c in classes], fontsize=7)
    shown = "" if len(classes) == len(support) else f" ({len(classes)} most frequent of {len(support)})"
    ax.set_xlabel(f"class (OOF positives){shown}")
    ax.set_ylabel("OOF F1")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncols=min(len(names), 3))
    ax.set_title("Per-class F1 on out-of-fold predictions, by decision strategy")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def plot_f1_vs_threshold(oof_true, oof_scores: np.ndarray, results: dict[str, dict], chosen: str,
                         path: Path) -> Path:
    """Small multiples: F1 of each class as its threshold moves; the chosen threshold marked (when the chosen
    decision has thresholds)."""
    support = count_labels(oof_true, 0)
    classes = _plotted_classes(support)
    grid = np.linspace(0.0, 1.0, 101)
    curves = f1_curves(oof_true[:, classes], oof_scores[:, classes], grid)  # the plotted classes only
    thresholds = results[chosen]["thresholds"]
    cols = 7
    rows = math.ceil(len(classes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 1.8 * rows), sharex=True, sharey=True, squeeze=False)
    for ax, j, c in zip(axes.flat, range(len(classes)), classes):
        ax.plot(grid, curves[:, j], lw=1.2)
        if np.isfinite(thresholds[c]):
            ax.axvline(thresholds[c], color="crimson", lw=0.9, ls="--")
        ax.set_title(f"class {c} (n={int(support[c])})", fontsize=8)
        ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(classes):]:
        ax.axis("off")
    fig.supxlabel("threshold")
    fig.supylabel("OOF F1")
    fig.suptitle(f"F1 vs threshold per class (dashed: {chosen})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return path


def plot_label_rates(train_rate: np.ndarray, test_rate: np.ndarray, path: Path, far: float = 3.0) -> Path:
    """Predicted test label rate against training label rate per class (log-log); the band is within
    ``far``x of the training rate. A degenerate submission shows as points far outside it."""
    floor = 0.5 / max(len(test_rate), 1) if len(test_rate) else 1e-4
    low = max(min(train_rate[train_rate > 0].min(initial=1.0), test_rate[test_rate > 0].min(initial=1.0)) / 2, 1e-4)
    grid = np.array([low, 1.0])
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.fill_between(grid, grid / far, np.minimum(grid * far, 1.0), color="0.9", label=f"within {far:g}x")
    ax.plot(grid, grid, color="0.5", lw=0.8)
    ax.scatter(np.maximum(train_rate, low), np.maximum(test_rate, floor), s=18)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training label rate")
    ax.set_ylabel("predicted test label rate")
    ax.set_title("Label rate per class: submission vs training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def plot_strategies(table: pd.DataFrame, path: Path, metric: MetricConfig | Metric | None = None,
                    reason: str | None = None) -> Path:
    """The configured metric of each strategy: fitted and scored in-sample vs cross-fold (the honest estimate);
    the strategy applied to test (``chosen`` in the table) outlined and named, with ``reason`` under the title."""
    metric = get_metric(metric)
    in_sample, cross_fold = metric_columns(metric)
    x = np.arange(len(table))
    chosen = (table["chosen"] != "").to_numpy()
    fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(table)), 3.9))
    ax.bar(x - 0.2, table[in_sample], 0.4, label="in-sample (optimistic)")
    ax.bar(x + 0.2, table[cross_fold], 0.4, label="cross-fold (honest)",
           edgecolor=np.where(chosen, "black", "none"), linewidth=np.where(chosen, 1.8, 0.0))
    for xi, value in zip(x, table[cross_fold]):
        ax.text(xi + 0.2, value + 0.01, f"{value:.3f}", ha="center", fontsize=8)
    ax.set_xticks(x, [f"{name}\n(chosen)" if is_chosen else name for name, is_chosen in zip(table["strategy"], chosen)],
                  fontsize=8)
    for label, is_chosen in zip(ax.get_xticklabels(), chosen):
        label.set_fontweight("bold" if is_chosen else "normal")
    ax.set_ylabel(f"OOF {metric.title}")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Decision strategies on out-of-fold predictions")
    if reason:
        fig.suptitle("\n".join(textwrap.wrap(f"chosen: {reason}", 110)), fontsize=7, y=0.99, va="top")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def write_report(report_dir: Path, header: str, results: dict[str, dict], chosen: str, oof_true,
                 oof_scores: np.ndarray, train_rate: np.ndarray, test_rate: np.ndarray,
                 staging: Staging | None = None, metric: MetricConfig | Metric | None = None, reason: str | None = None,
                 holdout: dict[str, dict] | None = None, ensembles: pd.DataFrame | None = None,
                 ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Path]]:
    """The prediction report, written as a whole folder: ``strategies.csv``, ``per_class.csv``, four plots
    and ``report.md``, scored by ``metric`` (default macro-F1; ``oof_true`` dense or sparse); ``reason`` says
    why ``chosen`` was applied (``src.thresholds.choose_strategy``); ``holdout``: the strategies compared on
    ``data.holdout`` (columns beside OOF's); ``ensembles``: :func:`ensemble_table` (``ensembles.csv``). Staged in
    ``staging`` (committed with the caller's other outputs), or swapped in at once. Returns the two tables (the
    per-class one with every class) and the plots' final paths."""
    metric = get_metric(metric)
    support = count_labels(oof_true, 0)
    strategies = strategy_table(results, chosen, metric, holdout)
    classes = class_table(results, chosen, support, train_rate, test_rate)
    if holdout is not None:  # the thresholds applied: fitted on the holdout
        classes["threshold"] = holdout[chosen]["thresholds"]
    names = {"strategies": "strategies.png", "per_class_f1": "per_class_f1.png",
             "f1_vs_threshold": "f1_vs_threshold.png", "label_rates": "label_rates.png"}

    def write(folder: Path) -> None:
        strategies.to_csv(folder / "strategies.csv", index=False)
        classes.to_csv(folder / "per_class.csv", index=False)
        if ensembles is not None:
            ensembles.to_csv(folder / "ensembles.csv", index=False)
        plot_strategies(strategies, folder / names["strategies"], metric, reason)
        plot_per_class_f1(results, support, folder / names["per_class_f1"], metric)
        plot_f1_vs_threshold(oof_true, oof_scores, results, chosen, folder / names["f1_vs_threshold"])
        plot_label_rates(train_rate, test_rate, folder / names["label_rates"])
        write_markdown(folder / "report.md", header, strategies, classes, names, metric, reason, ensembles)

    if staging is not None:
        staging.folder(report_dir, write)
    else:
        with Staging() as alone:
            alone.folder(report_dir, write)
            alone.commit()
    return strategies, classes, {key: report_dir / name for key, name in names.items()}


def write_markdown(path: Path, header: str, strategies: pd.DataFrame, classes: pd.DataFrame,
                   plots: dict[str, str], metric: MetricConfig | Metric | None = None, reason: str | None = None,
                   ensembles: pd.DataFrame | None = None) -> Path:
    """report.md: the two tables as fixed-width text (the per-class one capped at the most frequent
    classes), the strategy applied to test and why, and the plots inline."""
    metric = get_metric(metric)
    chosen = strategies.loc[strategies["chosen"] != "", "strategy"].tolist()
    applied = f"Applied to test: **{', '.join(chosen)}**" + (f": {reason}" if reason else "") + ".\n"

    def block(frame: pd.DataFrame) -> str:
        return "```\n" + frame.to_string(index=False, float_format=lambda v: f"{v:.4f}") + "\n```\n"

    listed = listed_classes(classes)
    per_class = "## Per class (chosen strategy)\n"
    if len(listed) < len(classes):
        per_class += (f"\nThe {len(listed)} most frequent of {len(classes)} classes; per_class.csv lists them "
                      "all.\n")
    note = "" if not metric.ranks_scores else (
        f"\n{metric.title} ranks the scores, so every strategy scores the same by it; the per-class "
        "F1 below still tells the strategies apart.\n")
    text = [f"# Prediction report\n\n{header}\n",
            f"## Decision strategies (OOF {metric.title}, `{metric.setting}`)\n{note}",
            block(strategies), applied]
    if ensembles is not None:
        text += ["## Ensembles (ways of combining the runs, src.ensemble)\n", block(ensembles)]
    text += [per_class, block(listed), "## Plots\n"]
    text += [f"![{name}]({file_name})\n" for name, file_name in plots.items()]
    path.write_text("\n".join(text))
    return path


def plot_lr_find(table: pd.DataFrame, suggested_lr: float, steepest_lr: float, backbone_ratio: float | None,
                 path: Path) -> Path:
    """Loss vs learning rate of a range test (log scale): raw and smoothed loss, the suggestion and the steepest
    descent marked; a top axis gives the backbone group's learning rate when it differs."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(table["lr"], table["loss"], color="0.75", lw=0.8, label="loss")
    ax.plot(table["lr"], table["smoothed_loss"], lw=1.8, label="smoothed loss")
    ax.axvline(suggested_lr, color="crimson", ls="--", lw=1, label=f"suggested train.lr {suggested_lr:.2g}")
    ax.axvline(steepest_lr, color="darkorange", ls=":", lw=1, label=f"steepest descent {steepest_lr:.2g}")
    ax.set_xscale("log")
    finite = table["smoothed_loss"][np.isfinite(table["smoothed_loss"])]
    if len(finite):
        low, high = finite.min(), finite.iloc[: max(3, len(finite) // 3)].max()
        ax.set_ylim(low - 0.1 * (high - low + 1e-9), high + 0.3 * (high - low + 1e-9))
    ax.set_xlabel("learning rate (head: train.lr)")
    ax.set_ylabel("training loss")
    if backbone_ratio not in (None, 1.0) and backbone_ratio > 0:
        top = ax.secondary_xaxis("top", functions=(lambda x: x * backbone_ratio, lambda x: x / backbone_ratio))
        top.set_xlabel("backbone learning rate (train.backbone_lr)")
    ax.legend(fontsize=8)
    ax.set_title("Learning-rate range test")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


# -- label embedding plots ---------------------------------------------------------------------------------
def _figure(figsize):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _chosen_labels(E: np.ndarray, support: np.ndarray | None, max_labels: int) -> np.ndarray:
    """Labels with an embedding: all when few, else the ``max_labels`` most frequent (first ones without support)."""
    seen = np.flatnonzero(np.asarray(E).any(axis=1))
    if len(seen) <= max_labels:
        return seen
    if support is None:
        return seen[:max_labels]
    return np.sort(seen[ranked_top(np.asarray(support)[seen][None, :], max_labels)[0]])


def plot_similarity_heatmap(E: np.ndarray, path: str | Path, max_labels: int = 60, support: np.ndarray | None = None,
                            label_names: Sequence[str] | None = None) -> Path:
    """Label-label cosine similarity in embedding space, labels ordered by average-linkage clustering so
    that groups of co-occurring labels show as blocks. Many labels: the ``max_labels`` most frequent."""
    from scipy.cluster.hierarchy import leaves_list, linkage

    from src.label_embedding import _normalize_rows  # here: it imports torch, which the other plots do not need

    unit = _normalize_rows(E)
    chosen = _chosen_labels(unit, support, max_labels)
    if len(chosen) > 2:
        distance = np.clip(1 - unit[chosen] @ unit[chosen].T, 0, 2)
        condensed = distance[np.triu_indices(len(chosen), 1)]
        chosen = chosen[leaves_list(linkage(condensed, method="average"))]
    similarity = unit[chosen] @ unit[chosen].T
    names = [str(label_names[c]) if label_names is not None else str(c) for c in chosen]
    size = max(5.0, 0.16 * len(chosen) + 2)
    fig = _figure((size + 1.2, size))
    ax = fig.subplots()
    image = ax.imshow(similarity, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    ticks = np.arange(len(chosen))
    ax.set_xticks(ticks, names, rotation=90, fontsize=6)
    ax.set_yticks(ticks, names, fontsize=6)
    which = "" if len(chosen) == len(unit) else f" ({len(chosen)} most frequent of {len(unit)})"
    ax.set_title(f"Label similarity in embedding space{which}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, format="png")
    return path


def plot_label_map(E: np.ndarray, path: str | Path, support: np.ndarray | None = None,
                   label_names: Sequence[str] | None = None, annotate_max: int = 60) -> Path:
    """2-D map of the labels: the first two principal components of the embedding rows, point area by
    support, labels annotated when there are at most ``annotate_max``."""
    from sklearn.decomposition import PCA

    from src.label_embedding import _normalize_rows  # here: it imports torch, which the other plots do not need

    unit = _normalize_rows(E)
    seen = np.flatnonzero(unit.any(axis=1))
    pca = PCA(n_components=2, random_state=0)
    xy = pca.fit_transform(unit[seen]) if min(len(seen), unit.shape[1]) >= 2 else np.zeros((len(seen), 2))
    counts = np.ones(len(seen)) if support is None else np.asarray(support, dtype=float)[seen]
    area = 8 + 250 * np.sqrt(counts / max(counts.max(), 1)) if len(seen) else []
    fig = _figure((8, 7))
    ax = fig.subplots()
    points = ax.scatter(xy[:, 0], xy[:, 1], s=area, c=np.log10(counts + 1), cmap="viridis", alpha=0.6,
                        linewidths=0)
    if support is not None:
        fig.colorbar(points, ax=ax, label="log10(support + 1)")
    if len(seen) <= annotate_max:
        for (x, y), label in zip(xy, seen):
            ax.annotate(str(label_names[label]) if label_names is not None else str(label), (x, y), fontsize=7,
                        ha="center", va="center")
    explained = getattr(pca, "explained_variance_ratio_", np.zeros(2))
    ax.set_xlabel(f"PC 1 ({explained[0]:.0%} of variance)")
    ax.set_ylabel(f"PC 2 ({explained[1]:.0%} of variance)")
    unseen = len(unit) - len(seen)
    ax.set_title(f"Label embedding, {len(seen)} labels, dim {unit.shape[1]}"
                 + (f" ({unseen} never seen, not shown)" if unseen else ""), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, format="png")
    return path


# -- hyperparameter search plots (src.tune) -----------------------------------------------------------------
def plot_tune_history(trials: pd.DataFrame, path: Path, objective: str, minimize: bool) -> Path:
    """Optimisation history of a study: each finished trial's score by trial number (complete trials: their
    result; pruned ones: the score of the last epoch they ran, marked apart) and the best result so far."""
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    complete = trials[trials["state"] == "COMPLETE"].sort_values("number")
    pruned = trials[trials["state"] == "PRUNED"]
    ax.scatter(complete["number"], complete["value"], color="tab:blue", zorder=3, label="complete: result")
    if len(pruned):
        ax.scatter(pruned["number"], pruned["last_score"], color="tab:orange", marker="x", zorder=3,
                   label="pruned: score at its last epoch (e<N>: epochs run)")
        for number, score, epochs in zip(pruned["number"], pruned["last_score"], pruned["epochs"]):
            ax.annotate(f"e{epochs}", (number, score), xytext=(4, 3), textcoords="offset points", fontsize=7,
                        color="tab:orange")
    if len(complete):
        best = complete["value"].cummin() if minimize else complete["value"].cummax()
        # The best so far, carried on to the last trial.
        ax.step(list(complete["number"]) + [trials["number"].max()], list(best) + [best.iloc[-1]], where="post",
                color="crimson", lw=1.4, label="best so far")
    failed = int((trials["state"] == "FAIL").sum())
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{objective} ({'lower' if minimize else 'higher'} is better)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)  # off the points
    ax.set_title("Optimisation history" + (f" ({failed} failed trial(s) not shown)" if failed else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def plot_param_importances(importances: dict[str, float], path: Path, note: str = "") -> Path:
    """Each searched parameter's importance (a share of the objective's variance, summing to 1) as bars, the
    most important on top; ``note`` replaces the bars when there is nothing to show (too few complete trials)."""
    fig, ax = plt.subplots(figsize=(7, 0.5 * max(3, len(importances)) + 1.2))
    if importances:
        names = list(importances)[::-1]
        values = [importances[name] for name in names]
        ax.barh(names, values, color="tab:blue")
        for y, value in enumerate(values):
            ax.text(value, y, f" {value:.2f}", va="center", fontsize=8)
        ax.set_xlim(0, max(values) * 1.15 + 1e-9)
        ax.set_xlabel("importance (fANOVA share of the objective's variance)")
    else:
        ax.axis("off")
    ax.set_title("Parameter importances" + (f"\n{note}" if note else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def plot_oof_vs_public(oof_estimate: np.ndarray, public_score: np.ndarray, labels: Sequence[str], path: Path,
                       metric: str, rho: float | None) -> Path:
    """Each scored submission as a point (its OOF cross-fold estimate vs its public leaderboard score, labelled),
    the y = x line, and the Spearman rank correlation ``rho`` in the title (None: too few points, or one side
    constant). Written as PNG to exactly ``path`` (a temp name is fine)."""
    fig, ax = plt.subplots(figsize=(6, 5.5))
    shown = np.concatenate([oof_estimate, public_score]) if len(oof_estimate) else np.array([0.0, 1.0])
    low, high = float(shown.min()), float(shown.max())
    pad = max(0.02, 0.08 * (high - low))
    ax.plot([low - pad, high + pad], [low - pad, high + pad], color="grey", linestyle="--", linewidth=1,
            label="y = x")
    ax.scatter(oof_estimate, public_score, color="tab:blue", zorder=3)
    for x, y, label in zip(oof_estimate, public_score, labels):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xlim(low - pad, high + pad)
    ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel(f"OOF {metric}, cross-fold estimate")
    ax.set_ylabel("public leaderboard score")
    correlation = (f"Spearman rho {rho:.2f}" if rho is not None else "Spearman rho: needs 2+ scored submissions"
                   if len(oof_estimate) < 2 else "Spearman rho undefined: a side's scores are all equal")
    ax.set_title(f"OOF estimate vs public score ({len(oof_estimate)} submissions; {correlation})", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path
