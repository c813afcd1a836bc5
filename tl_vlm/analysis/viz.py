"""Plots of the analyses. Each saves a PNG and returns its path when given one, else returns the ``Figure``
(a notebook shows it inline). Uses matplotlib's object API (no pyplot), so no GUI backend or global figure
state is touched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def _save(fig: Figure, path) -> Path | Figure:
    if path is None:
        return fig
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def heatmap_over_image(image, heat, path=None, alpha: float = 0.5, title: str | None = None) -> Path | Figure:
    """A [height, width] map (e.g. ``confidence.localization``) drawn over the image it belongs to."""
    heat = np.asarray(heat, dtype=float)
    fig = Figure(figsize=(4, 4 * image.size[1] / image.size[0]))
    ax = fig.add_subplot()
    ax.imshow(image)
    shown = ax.imshow(heat, cmap="jet", alpha=alpha, extent=(0, image.size[0], image.size[1], 0))
    fig.colorbar(shown, ax=ax, fraction=0.046)
    ax.set_axis_off()
    ax.set_title(title or "")
    return _save(fig, path)


def layer_position_map(
    values, path=None, xlabel: str = "image token", ylabel: str = "layer", title: str | None = None
) -> Path | Figure:
    """A [layer, position] matrix (e.g. one row of ``confidence.confidence_map``), layer 0 at the bottom."""
    values = np.asarray(values, dtype=float)
    fig = Figure(figsize=(max(4, values.shape[1] / 8), max(3, values.shape[0] / 4)))
    ax = fig.add_subplot()
    shown = ax.imshow(values, aspect="auto", origin="lower", cmap="viridis")
    fig.colorbar(shown, ax=ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title or "")
    return _save(fig, path)


def layer_sweep_plot(
    sweep: pd.DataFrame, path=None, answer_accuracy: float | None = None, title: str | None = None
) -> Path | Figure:
    """Probe and control accuracy along the hooks of ``probing.layer_sweep`` (towers in order, boundaries marked),
    with the model's own answer accuracy as a horizontal line."""
    fig = Figure(figsize=(max(5, len(sweep) / 3), 3.5))
    ax = fig.add_subplot()
    x = np.arange(len(sweep))
    ax.plot(x, sweep["accuracy"], marker="o", label="probe")
    ax.plot(x, sweep["control_accuracy"], marker="x", linestyle="--", label="control (shuffled labels)")
    if answer_accuracy is not None:
        ax.axhline(answer_accuracy, color="k", linestyle=":", label="model answer accuracy")
    towers = sweep["tower"].fillna("").tolist()
    for i in range(1, len(towers)):
        if towers[i] != towers[i - 1]:
            ax.axvline(i - 0.5, color="grey", linewidth=0.8)
    ax.set_xticks(x, [f"{t} {l}" if t else h for t, l, h in zip(towers, sweep["layer"], sweep["hook"])], rotation=90)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower right", fontsize="small")
    ax.set_title(title or "")
    return _save(fig, path)


def effect_by_layer_plot(effects: pd.DataFrame, path=None, title: str | None = None) -> Path | Figure:
    """Mean drop in the answer's probability per knockout window start (``flow.knockout_by_layer``)."""
    mean = effects.groupby("start")["drop"].mean()
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    ax.plot(mean.index, mean.values, marker="o")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("first knocked-out layer")
    ax.set_ylabel("drop in answer probability")
    ax.set_title(title or "")
    return _save(fig, path)


def region_map_over_image(image, regions: pd.DataFrame, path=None, title: str | None = None) -> Path | Figure:
    """The drops of ``flow.region_ablation_map`` for one image, painted over it."""
    heat = np.zeros((image.size[1], image.size[0]))
    for row in regions.itertuples():
        heat[int(round(row.y0)):int(round(row.y1)), int(round(row.x0)):int(round(row.x1))] = row.drop
    return heatmap_over_image(image, heat, path, title=title)


def scatter_2d(coords: pd.DataFrame, labels, path=None, title: str | None = None) -> Path | Figure:
    """The first two columns of ``geometry.pca`` coordinates, one colour per label."""
    labels = np.asarray(labels)
    fig = Figure(figsize=(4.5, 4))
    ax = fig.add_subplot()
    for label in np.unique(labels):
        at = labels == label
        ax.scatter(coords.iloc[at, 0], coords.iloc[at, 1], label=str(label), s=12)
    ax.set_xlabel(coords.columns[0])
    ax.set_ylabel(coords.columns[1])
    ax.legend(fontsize="small")
    ax.set_title(title or "")
    return _save(fig, path)


def confidence_histogram(mentions: pd.DataFrame, path=None, title: str | None = None) -> Path | Figure:
    """Internal confidence of real vs hallucinated mentions (``hallucination.score_mentions`` output)."""
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    bins = np.linspace(0, 1, 21)
    for flag, name in ((False, "real"), (True, "hallucinated")):
        ax.hist(mentions.loc[mentions["hallucinated"] == flag, "confidence"], bins=bins, alpha=0.6, label=name)
    ax.set_xlabel("internal confidence c(o)")
    ax.set_ylabel("mentions")
    ax.legend()
    ax.set_title(title or "")
    return _save(fig, path)


def mention_rates_plot(report: pd.DataFrame, path=None, title: str | None = None) -> Path | Figure:
    """Before / after bars of ``editing.removal_report``."""
    fig = Figure(figsize=(max(4, len(report)), 3.5))
    ax = fig.add_subplot()
    x = np.arange(len(report))
    ax.bar(x - 0.2, report["mentioned_before"], width=0.4, label="before")
    ax.bar(x + 0.2, report["mentioned_after"], width=0.4, label="after ProjectAway")
    ax.set_xticks(x, report["object"])
    ax.set_ylabel("fraction of captions mentioning")
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.set_title(title or "")
    return _save(fig, path)
