"""What a trained ResiDual run changed: per-unit gains of λ and the most amplified / suppressed
principal components, each described in words (SOMP on a text dictionary).

Used by ``task=analysis analysis=text_spans analysis.run_dir=RUN``.  Inputs are the run's
:class:`~residual_exp.results.TrainedLambda`, the bases it was trained on (rebuilt from the
run's config, same cache keys) and an encoded dictionary; outputs are tables, a plot and the
markdown lines of the report.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from omegaconf import OmegaConf

from ..config import ConventionsConfig, DatasetConfig, MethodConfig, ModelConfig, PCAConfig
from ..methods import build_adapter, prune_rule
from ..results import ResultsFileError, TrainedLambda, load_lambda, read_run_config
from ..tables import write_table
from . import text_spans as ts
from .plots import plot_lambda_gains

log = logging.getLogger(__name__)


def load_run(run_dir: Path):
    """``(TrainedLambda, run config)`` of a ``task=train`` run dir (its λ file and config.json;
    the config holds the run's model, dataset, pca, method nodes and seed)."""
    conf = read_run_config(run_dir)
    if conf.get("task", {}).get("name", "train") != "train":
        raise ResultsFileError(f"analysis.run_dir={run_dir}: a run of task={conf['task']['name']}, not a training run")
    schemas = {"model": ModelConfig, "dataset": DatasetConfig, "pca": PCAConfig, "method": MethodConfig,
               "conventions": ConventionsConfig}
    missing = [k for k in schemas if k not in conf]
    if missing:
        raise ResultsFileError(f"analysis.run_dir={run_dir}: its config.json lacks {missing}: not the config of a "
                               "task=train run")
    known = lambda schema, d: {k: v for k, v in d.items() if k in schema.__dataclass_fields__}   # older configs too
    run = OmegaConf.create({k: OmegaConf.merge(OmegaConf.structured(v), known(v, conf[k])) for k, v in schemas.items()})
    method = conf["method"]          # runs before the rank group kept evr / k in the method node
    run.rank = conf.get("rank") or {"name": "legacy", "evr": method.get("evr"), "k": method.get("k")}
    run.seed = int(conf.get("seed", 0))
    run.compat = str(conf.get("compat", "none"))
    try:
        return load_lambda(run_dir), run
    except FileNotFoundError as e:
        raise ResultsFileError(f"analysis.run_dir={run_dir}: {e}") from None


def run_report(trained: TrainedLambda, run, session, unit_basis, output_basis, atoms, texts, out: Path,
               n_lambda: int, n_descriptions: int, run_dir) -> list[str]:
    """The report of a trained run (``coarse_report`` or ``spectral_report``) on the bases the
    run was trained on, with its initial λ rebuilt from its seed."""
    lines = [f"# Trained run: {trained.method} on {run.dataset.name} ({run_dir})", ""]
    if trained.mask is None or trained.lam is None or trained.lam.ndim != 2:
        return lines + coarse_report(trained, out, n_lambda)
    layout = session.backbone.layout
    units = [] if trained.units == ["output"] else [layout.index(n) for n in trained.units]
    basis = unit_basis.select(units) if units else output_basis
    basis = basis.prune(evr=run.rank.evr, k=run.rank.k, **prune_rule(run.conventions.evr_rule, run.compat))
    basis = basis.compact().to(device="cpu")
    lam_init = initial_lambda(run, session, unit_basis, output_basis, trained.lam.shape, units)
    return lines + spectral_report(trained, basis, layout, atoms, texts, lam_init, out, run.dataset.name, n_lambda,
                                   n_descriptions)


def initial_lambda(run, session, unit_basis, output_basis, shape, units=()) -> torch.Tensor | None:
    """The seeded initial λ of the run, rebuilt exactly as ``task=train`` built it (so that
    Δλ is what training changed), or None when it cannot be rebuilt."""
    try:
        adapter = build_adapter(run.method, session.source, session.backbone.output_dim, unit_basis, output_basis,
                                backbone=session.backbone, seed=run.seed, evr_rule=run.conventions.evr_rule,
                                compat=run.compat, units=units, rank=run.rank)
    except Exception as e:  # diagnostic only: the report falls back to λ_init = 1
        log.warning("could not rebuild the initial λ: %s", e)
        return None
    if hasattr(adapter, "lambdas") and tuple(adapter.lambdas().shape) == tuple(shape):
        return adapter.lambdas().detach().double().cpu()
    return None


def coarse_report(trained: TrainedLambda, out: Path, n_lambda: int) -> list[str]:
    """``residual_coarse``: one scalar per unit, no components to describe."""
    lam = trained.lam.double()
    order = torch.argsort(lam.abs(), descending=True).tolist()
    rows = [{"unit": trained.units[i], "lambda": float(lam[i])} for i in order]
    write_table(rows, out / "lambda_units", f"{trained.method}: λ per unit")
    return [f"{trained.method} trains one scalar per unit (no components to describe). Largest |λ|: "
            + ", ".join(f"{r['unit']} ({r['lambda']:+.2f})" for r in rows[:n_lambda]), ""]


def spectral_report(trained: TrainedLambda, basis, layout, atoms: torch.Tensor, texts, lam_init, out: Path,
                    dataset: str, n_lambda: int, n_descriptions: int) -> list[str]:
    """Gains per unit and the most amplified / suppressed components of a spectral run.

    ``basis``: the run's bases of its units (pruned as the run pruned them, compacted), whose
    ``mask`` must have the shape of the trained λ.
    """
    units, method, lam, mask = trained.units, trained.method, trained.lam.double(), trained.mask
    if tuple(basis.mask.shape) != tuple(mask.shape):
        raise ValueError(f"the run's λ is {tuple(mask.shape)} but the refitted basis is {tuple(basis.mask.shape)}: "
                         "the run used other bases (pca.* / method.evr / method.k or reference data) than can "
                         "be rebuilt here")
    eig = basis.eigenvalues.double()
    comp_rows = ts.lambda_components(lam, mask, eig, basis.explained_variance_ratio, units, lam_init)
    gains = ts.unit_gains(lam, mask, eig)
    gains_init = ts.unit_gains(lam_init, mask, eig) if lam_init is not None else None
    unit_rows = [{"unit": n, "kind": layout.kinds[layout.index(n)] if n in layout.names else "output",
                  "gain": float(g), "n_components": int(mask[i].sum()),
                  **({"gain_init": float(gains_init[i])} if gains_init is not None else {})}
                 for i, (n, g) in enumerate(zip(units, gains.tolist()))]
    by_gain = sorted(unit_rows, key=lambda r: -np.nan_to_num(r["gain"], nan=-1))
    write_table(by_gain, out / "lambda_units", "Per-unit gain sqrt(Σ λ² e / Σ e) of the trained λ")
    plot_lambda_gains(units, gains.tolist(), out / "lambda_gains.png", f"{method} on {dataset}: per-unit gain of λ",
                      gains_init.tolist() if gains_init is not None else None)
    dct = atoms.double().numpy()

    def describe(unit: str, pc: int, n: int = 3) -> str:
        phi = basis.components[units.index(unit), pc].double().numpy()
        res = ts.somp(phi[None], dct, n)
        return ", ".join(f"{'+' if phi @ dct[j] >= 0 else '−'}{texts[j]}" for j in res.support)

    # rank by the change of the component's variance share (λ² − λ_init²)·evr: what training added or
    # removed (λ_init = 1, i.e. "unchanged", when the initial λ cannot be rebuilt)
    for r in comp_rows:
        r.setdefault("delta_share", r["share"] - r["evr"])
    amplified = sorted(comp_rows, key=lambda r: -r["delta_share"])[:n_lambda]
    suppressed = sorted(comp_rows, key=lambda r: r["delta_share"])[:n_lambda]
    for r in amplified + suppressed:
        r["descriptions"] = describe(r["unit"], r["pc"])
    write_table([dict(r, which="amplified") for r in amplified] + [dict(r, which="suppressed") for r in suppressed],
                out / "lambda_components", f"{method}: most amplified / suppressed components")
    write_table(comp_rows, out / "lambda_all_components", f"{method}: λ of every kept component")
    lines = ["Units ranked by gain (variance-weighted RMS λ): "
             + ", ".join(f"{r['unit']} {r['gain']:.2f}" for r in by_gain[:8]), ""]
    heads = [r for r in by_gain if r["kind"] == "head"]
    if heads:
        top = heads[0]["unit"]
        s = units.index(top)
        order = torch.argsort((lam[s].abs() * eig[s].clamp_min(0).sqrt()) * mask[s], descending=True)[:3].tolist()
        lines += [f"Head with the largest gain: **{top}** (gain {heads[0]['gain']:.2f}); its components with "
                  "the largest |λ|·σ:"]
        lines += [f"- PC{k} (EVR {float(basis.explained_variance_ratio[s, k]):.2f}, λ {float(lam[s, k]):+.2f}): "
                  + describe(top, k, n_descriptions) for k in order]
        lines.append("")
    init_note = "λ_init rebuilt from the run's seed" if lam_init is not None else "λ_init taken as 1"
    fmt = lambda r: (f"- {r['unit']} PC{r['pc']} (EVR {r['evr']:.3f}, λ {r['lambda']:+.2f}"
                     + (f" from {r['lambda_init']:+.2f}" if "lambda_init" in r else "")
                     + f", Δshare {r['delta_share']:+.3f}): {r['descriptions']}")
    lines += [f"## Most amplified components (largest Δshare = (λ² − λ_init²)·EVR; {init_note})", ""]
    lines += [fmt(r) for r in amplified]
    lines += ["", "## Most suppressed components (most negative Δshare)", ""]
    lines += [fmt(r) for r in suppressed] + [""]
    return lines
