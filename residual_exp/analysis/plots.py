"""Outputs of the analyses: PNG plots (matplotlib, Agg backend); tables are
:mod:`residual_exp.tables` (re-exported here for the analyses' glue).

Library code: every function takes plain rows / arrays and a path; nothing here knows about
Hydra, models or data.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..atomic import atomic_write_text, save_figure
from ..tables import markdown_table, write_table

__all__ = ["write_table", "markdown_table", "plot_id_profiles", "plot_heatmaps", "plot_selection_curves",
           "plot_similarity_profiles", "plot_lambda_gains"]


# --------------------------------------------------------------------------- plots
def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    save_figure(fig, path, dpi=120, bbox_inches="tight")
    _plt().close(fig)
    return Path(path)


def plot_id_profiles(profiles: Mapping[str, Sequence[Mapping]], path: str | os.PathLike,
                     threshold: float = 0.99) -> Path:
    """Per-layer intrinsic-dimension profiles, one line per model.

    ``profiles[model]`` are rows with ``layer``, ``num_layers`` and ``linear_mean/std``,
    ``twonn_mean/std``, ``ratio_mean/std`` (means over the heads of the layer).  The x axis is
    the layer index when every model has the same depth, else the relative depth l / (L − 1).
    """
    plt = _plt()
    depths = {int(r["num_layers"]) for rows in profiles.values() for r in rows}
    relative = len(depths) > 1
    panels = [("linear", f"linear dim. (#PCs, {threshold:.0%} var.)"), ("twonn", "TwoNN dimension"),
              ("ratio", "linear / TwoNN")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for model, rows in profiles.items():
        rows = sorted(rows, key=lambda r: r["layer"])
        x = np.array([r["layer"] / max(1, r["num_layers"] - 1) if relative else r["layer"] for r in rows], float)
        for ax, (key, label) in zip(axes, panels):
            m = np.array([r[f"{key}_mean"] for r in rows], float)
            s = np.array([r[f"{key}_std"] for r in rows], float)
            ax.plot(x, m, marker="o", label=model)
            ax.fill_between(x, m - s, m + s, alpha=0.15)
            ax.set_ylabel(label)
    for ax in axes:
        ax.set_xlabel("relative depth" if relative else "layer")
        ax.grid(alpha=0.3)
        if not relative:
            ax.set_xticks(sorted({int(r["layer"]) for rows in profiles.values() for r in rows}))
    axes[0].legend(fontsize=8)
    fig.suptitle("Intrinsic dimension of attention heads across depth (mean ± std over heads)")
    fig.tight_layout()
    return _save(fig, path)


def plot_heatmaps(grids: Mapping[str, np.ndarray], path: str | os.PathLike, title: str = "",
                  vmin: float = 0.0, vmax: float = 1.0, xlabel: str = "head", ylabel: str = "layer",
                  cmap: str = "viridis") -> Path:
    """One heatmap per entry of ``grids`` (``[rows, cols]``, NaN cells blank), shared colour scale."""
    plt = _plt()
    n = len(grids)
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols + 0.8, 3.2 * nrows + 0.5), squeeze=False,
                             constrained_layout=True)
    im = None
    for ax, (name, g) in zip(axes.flat, grids.items()):
        g = np.asarray(g, float)
        im = ax.imshow(np.ma.masked_invalid(g), vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if g.shape[0] <= 32:
            ax.set_yticks(range(g.shape[0]))
        if g.shape[1] <= 32:
            ax.set_xticks(range(g.shape[1]))
        if g.size <= 64:
            for (i, j), v in np.ndenumerate(g):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if v < (vmin + vmax) / 2 else "black")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_selection_curves(curves: Mapping[str, Mapping[str, np.ndarray]], ks: Sequence[int], num_heads: int,
                          path: str | os.PathLike, references: Mapping[str, float] | None = None,
                          title: str = "") -> Path:
    """Accuracy vs heads kept: ``curves[ablation][score] = [runs, len(ks)]`` (runs > 1: mean ± std)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 3.8), squeeze=False)
    x = np.asarray(ks, float)
    for ax, (ablation, by_score) in zip(axes[0], curves.items()):
        for score, acc in by_score.items():
            acc = np.atleast_2d(np.asarray(acc, float))
            m = acc.mean(0)
            if acc.shape[0] > 1:
                s = acc.std(0)
                line, = ax.plot(x, m, marker=".", linestyle="--", label=f"{score} (mean ± std, {acc.shape[0]} seeds)")
                ax.fill_between(x, m - s, m + s, alpha=0.2, color=line.get_color())
            else:
                ax.plot(x, m, marker="o", label=score)
        for (name, v), style in zip((references or {}).items(), (":", "-.", (0, (1, 3)))):
            ax.axhline(v, color="grey", linestyle=style, linewidth=1, label=f"{name} ({v:.3f})")
        ax.set_xscale("log")
        ax.set_xticks(x)
        ax.set_xticklabels([f"{int(k)}" for k in x])
        ax.minorticks_off()
        ax.set_xlabel(f"heads kept (of {num_heads})")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{ablation}-ablation of the other heads", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_similarity_profiles(profiles: Mapping[str, Mapping[str, Sequence[float]]], path: str | os.PathLike,
                             title: str = "") -> Path:
    """Per-layer mean similarity: ``profiles[model][dataset] = [L]`` → one line per (model, dataset)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    depths = {len(v) for d in profiles.values() for v in d.values()}
    relative = len(depths) > 1
    for model, by_ds in profiles.items():
        for ds, prof in by_ds.items():
            prof = np.asarray(prof, float)
            x = np.arange(len(prof)) / max(1, len(prof) - 1) if relative else np.arange(len(prof))
            ax.plot(x, prof, marker="o", label=f"{model} · {ds}")
    ax.set_xlabel("relative depth" if relative else "layer")
    if not relative and depths:
        ax.set_xticks(range(max(depths)))
    ax.set_ylabel("mean spectral cosine (heads)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_lambda_gains(names: Sequence[str], gains: Sequence[float], path: str | os.PathLike,
                      title: str = "", gains_init: Sequence[float] | None = None) -> Path:
    """Bar chart of per-unit λ gains (variance-weighted RMS λ); black ticks: the gains at init."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 0.28 * len(names) + 1), 3.4))
    ax.bar(range(len(names)), gains, color="tab:blue", label="trained")
    if gains_init is not None:
        ax.scatter(range(len(names)), gains_init, marker="_", s=120, color="black", zorder=3, label="at init")
        ax.legend(fontsize=7)
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("gain  sqrt(Σ λ² e / Σ e)")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def save_text(lines: Iterable[str], path: str | os.PathLike) -> Path:
    atomic_write_text(path, "\n".join(lines) + "\n")
    return Path(path)
