"""Plots of ``task=report`` (matplotlib, Agg): accuracy vs trainable parameters, gain over
zero-shot per dataset, and the per-unit λ spectra of one run."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..atomic import save_figure  # noqa: E402
from ..catalog import method_order  # noqa: E402
from ..results import LAMBDA_FILE, load_lambda  # noqa: E402


def _methods(df) -> list[str]:
    present = set(df.method)
    order = method_order()
    return [m for m in order if m in present] + sorted(present - set(order))


def _colors(methods: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def plot_accuracy_vs_params(df, path: Path) -> Path:
    """Test accuracy vs trainable parameters (log x): one point per (model, dataset, seed),
    a large marker at each method's mean (geometric mean of parameters).  Zero-shot has no
    trainable parameter and is drawn at x = 1."""
    methods = _methods(df)
    colors = _colors(methods)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for m in methods:
        d = df[df.method == m]
        x = np.maximum(d.trainable_params.to_numpy(dtype=float), 1.0)
        y = d.test_accuracy.to_numpy(dtype=float) * 100
        ax.scatter(x, y, s=14, alpha=0.35, color=colors[m], edgecolors="none")
        ax.scatter([np.exp(np.log(x).mean())], [y.mean()], s=120, color=colors[m], edgecolors="black",
                   linewidths=0.8, label=f"{m} ({int(np.median(d.trainable_params)):,} params, {y.mean():.1f}%)",
                   zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log; zero-shot drawn at 1)")
    ax.set_ylabel("test accuracy (%)")
    n_models, n_ds = df.model.nunique(), df.dataset.nunique()
    ax.set_title(f"Accuracy vs trainable parameters ({n_models} model(s) × {n_ds} dataset(s))")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def plot_gain_over_zero_shot(df, path: Path) -> Path:
    """Grouped bars: test accuracy minus the zero-shot test accuracy (percentage points) per
    dataset for every trained method; one panel per model (mean over seeds)."""
    methods = [m for m in _methods(df) if m != "base"]
    colors = _colors(_methods(df))
    models = sorted(df.model.unique())
    datasets = sorted(df.dataset.unique())
    fig, axes = plt.subplots(len(models), 1, figsize=(max(7.0, 1.1 * len(datasets) * max(1, len(methods)) / 3), 3.2 * len(models)),
                             squeeze=False)
    width = 0.8 / max(1, len(methods))
    for ax, model in zip(axes[:, 0], models):
        d = df[df.model == model]
        for i, m in enumerate(methods):
            g = d[d.method == m].groupby("dataset").gain.mean() * 100
            vals = [g.get(ds, np.nan) for ds in datasets]
            ax.bar(np.arange(len(datasets)) + (i - (len(methods) - 1) / 2) * width, vals, width,
                   color=colors[m], label=m)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(np.arange(len(datasets)))
        ax.set_xticklabels(datasets, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("gain over zero-shot (pp)")
        ax.set_title(model)
        ax.grid(True, axis="y", alpha=0.3)
    if methods:
        axes[0, 0].legend(fontsize=7, ncol=min(len(methods), 3), loc="best")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def find_lambda_run(records: list[dict], preference) -> Path | None:
    """The newest run with ``lambda.safetensors``, preferring methods in ``preference`` order."""
    rank = {m: i for i, m in enumerate(preference)}
    cands = [r for r in records if r["method"] != "base" and (Path(r["run_dir"]) / LAMBDA_FILE).is_file()]
    if not cands:
        return None
    best = min(cands, key=lambda r: (rank.get(r["method"], len(rank)), -r["mtime"]))
    return Path(best["run_dir"])


def plot_lambda_spectra(run_dir: Path, path: Path) -> Path:
    """Per-unit λ spectra of one run.

    Spectral methods (λ ``[S, K]`` with ``mask``): a heatmap units × principal component
    (untrained / pruned entries blank) and every unit's λ_k against k, coloured by depth.
    ``residual_coarse`` (λ ``[S]``): one bar per head.
    """
    trained = load_lambda(run_dir)
    if trained.lam is None:
        raise ValueError(f"{run_dir}: its λ file holds no 'lambda' tensor (method {trained.method}: tensors "
                         f"{sorted(trained.tensors)})")
    lam = trained.lam.double().numpy()
    mask = trained.mask.numpy() if trained.mask is not None else None
    units, method = trained.units, trained.method
    title = f"λ of {Path(run_dir).name} ({method})"
    if lam.ndim == 1:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(units)), 3.5))
        ax.bar(np.arange(len(units)), lam, color=plt.get_cmap("viridis")(np.linspace(0, 1, len(units))))
        ax.axhline(1, color="gray", linestyle="--", linewidth=0.8)
        ax.set_xticks(np.arange(len(units)))
        ax.set_xticklabels(units, rotation=90, fontsize=max(4, min(8, 400 // max(1, len(units)))))
        ax.set_ylabel("λ (one per head)")
        ax.set_title(title)
    else:
        shown = np.where(mask.astype(bool), lam, np.nan) if mask is not None else lam.astype(float)
        k_used = int(np.max(np.nonzero(np.any(~np.isnan(shown), axis=0))[0]) + 1) if np.any(~np.isnan(shown)) else lam.shape[1]
        shown = shown[:, :k_used]
        fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, max(4.0, min(12.0, 0.18 * len(units) + 2))),
                                       gridspec_kw={"width_ratios": [1.2, 1]})
        vmax = np.nanmax(np.abs(shown)) if np.any(~np.isnan(shown)) else 1.0
        im = ax0.imshow(shown, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest",
                        extent=(0.5, k_used + 0.5, len(units) - 0.5, -0.5))           # PCs numbered from 1
        step = max(1, len(units) // 40)
        ax0.set_yticks(np.arange(0, len(units), step))
        ax0.set_yticklabels(units[::step], fontsize=7)
        ax0.set_xlabel("principal component k (1 = largest variance)")
        ax0.set_title(title)
        fig.colorbar(im, ax=ax0, label="λ (blank: pruned / untrained)")
        colors = plt.get_cmap("viridis")(np.linspace(0, 1, len(units)))
        for i in range(len(units)):
            ax1.plot(np.arange(1, k_used + 1), shown[i], color=colors[i], linewidth=0.9, alpha=0.8,
                     marker="." if k_used <= 32 else None, markersize=3)
        ax1.axhline(1, color="gray", linestyle="--", linewidth=0.8)
        ax1.axhline(0, color="black", linewidth=0.6)
        ax1.set_xscale("log" if k_used > 32 else "linear")
        ax1.set_xlabel("principal component k (1 = largest variance)")
        ax1.set_ylabel("λ_k")
        ax1.set_title(f"per-unit spectra ({len(units)} units; colour = depth, {units[0]} → {units[-1]})")
        ax1.grid(True, alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path
