"""``task=analysis analysis=NAME``: the paper's analyses — glue from configs to the library
(:mod:`residual_exp.analysis`) and to files in the run dir (``*.csv`` + ``*.md`` tables, PNGs).

==========================  ======================================================================
``intrinsic_dimension``     per-unit linear dim (#PCs for 99%) vs TwoNN and their ratio; per-layer
                            profiles across depth for every model in ``analysis.models``
``spectral_similarity``     spectral cosine of unit bases: reference vs each of ``analysis.datasets``
                            (layers × heads heatmaps), and across models (``cross_model``)
``coarse_selection``        head scores, keep top k, zero/mean-ablate the rest, accuracy curves
``text_spans``              TextSpan/SOMP descriptions of head PCs (+ λ of a trained run)
==========================  ======================================================================

Other models / datasets are composed by Hydra (:mod:`residual_exp.compose`); encodings, bases
and classifiers come from the same content-keyed cache as ``task=train`` (:class:`Session`).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from ..analysis import coarse_selection as cs
from ..analysis import lambda_report
from ..analysis import text_spans as ts
from ..analysis.intrinsic_dimension import layer_profiles, unit_dimensions
from ..analysis.plots import (plot_heatmaps, plot_id_profiles, plot_selection_curves, plot_similarity_profiles,
                              save_text)
from ..analysis.similarity import (dataset_similarity, grid_of, layer_profile, profile_correlation,
                                   raw_cross_model, similarity_options, similarity_rows, summary_row, unit_grid)
from ..classifiers import top1_accuracy
from ..compose import entry_nodes, group_node, group_options
from ..pipeline import Session, reference_dataset
from ..runtime import run_dir_of, seed_everything
from ..tables import markdown_table, write_table

log = logging.getLogger(__name__)


def analysis(cfg: DictConfig) -> int:
    """Run ``cfg.analysis`` (exit code: 0 ok, 2 no/unknown analysis chosen)."""
    a, names = cfg.get("analysis"), group_options("analysis")
    if a is None or not a.get("name") or a.name not in RUNNERS:
        what = "needs an analysis: add analysis=NAME" if a is None or not a.get("name") else \
            f"analysis.name={a.name!r} is not an analysis"
        print(f"task=analysis {what}; valid: {', '.join(names)}\n"
              f"  e.g. python -m residual_exp task=analysis analysis={names[0]}", file=sys.stderr)
        return 2
    seed_everything(cfg.seed)
    out = run_dir_of(cfg)
    out.mkdir(parents=True, exist_ok=True)
    code = RUNNERS[a.name](cfg, a, out)
    print(f"analysis {a.name}: outputs in {out}")
    return int(code or 0)


def _session(cfg, a, model_cfg, units: str | None = None) -> Session:
    s = Session.open(cfg, model_cfg, progress=bool(a.progress), batch_size=a.get("batch_size"))
    s.backbone.use_convention(units or cfg.conventions.units)          # (a trained run's own units)
    return s


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def run_intrinsic_dimension(cfg, a, out: Path) -> int:
    all_rows, profiles, grids = [], {}, {}
    for label, mcfg in entry_nodes(a.models, "model", cfg):
        s = _session(cfg, a, mcfg)
        lay = s.backbone.layout
        enc, _ = s.encode(cfg.dataset, a.split, a.max_samples)
        rows = unit_dimensions(enc.units, lay.names, lay.indices(a.units), lay.kinds, lay.layers, lay.heads,
                               threshold=a.variance_threshold, discard_fraction=a.discard_fraction,
                               estimator=a.estimator, chunk_size=a.chunk_size, progress=s.progress,
                               desc=f"intrinsic dimension {label}")
        all_rows += (rows := [{"model": label, "dataset": cfg.dataset.name, "split": a.split, **r} for r in rows])
        profiles[label] = [{"model": label, **p} for p in layer_profiles(rows)]
        heads = [r for r in rows if r["kind"] == "head"]
        for key in ("linear_dim", "twonn") if heads else ():
            grids[f"{label} · {key}"] = grid_of([r[key] for r in heads], [r["layer"] for r in heads],
                                                [r["head"] for r in heads], lay.num_layers, lay.num_heads)
    write_table(all_rows, out / "intrinsic_dimension", "Intrinsic dimension per unit")
    prof_rows = [r for rows in profiles.values() for r in rows]
    write_table(prof_rows, out / "id_profiles", "Per-layer intrinsic dimension (mean ± std over heads)")
    if prof_rows:
        plot_id_profiles(profiles, out / "id_profiles.png", a.variance_threshold)
    if grids:
        vmax = max(float(np.nanmax(g)) for g in grids.values() if np.isfinite(g).any())
        plot_heatmaps(grids, out / "id_heads.png", "per-head linear dimension and TwoNN", vmin=0, vmax=vmax)
    print(markdown_table(prof_rows, ["model", "layer", "n_units", "linear_mean", "twonn_mean", "ratio_mean"]))
    return 0


def run_spectral_similarity(cfg, a, out: Path) -> int:
    ref = reference_dataset(cfg.pca, cfg.dataset) if a.reference is None else \
        cfg.dataset if a.reference == cfg.dataset.name else group_node("dataset", a.reference, cfg)
    ref_split = a.reference_split or cfg.pca.split
    ref_max = a.reference_max_samples if a.reference_max_samples is not None else cfg.pca.max_samples
    ref_label = f"{ref.name}/{ref_split}"
    datasets = entry_nodes(a.datasets, "dataset", cfg)
    rows, profiles, head_bases, summary = [], {}, {}, []
    for label, mcfg in entry_nodes(a.models, "model", cfg):
        s = _session(cfg, a, mcfg)
        lay = s.backbone.layout
        idx = lay.indices(a.units)
        names, kinds = [lay.names[i] for i in idx], [lay.kinds[i] for i in idx]
        layers, heads = [lay.layers[i] for i in idx], [lay.heads[i] for i in idx]
        ref_basis, _ = s.bases(ref, ref_split, ref_max)
        head_bases[label] = (ref_basis.select(lay.indices("heads")).prune(evr=a.evr).compact(), lay)
        grids = {}
        for ds_label, ds_cfg in datasets:
            basis, _ = s.bases(ds_cfg, a.split, a.max_samples)
            for variant in a.variants:
                sims = dataset_similarity(ref_basis, basis, idx, variant == "weighted", a.evr, **similarity_options(cfg))
                rows += [{"reference": ref_label, **r} for r in
                         similarity_rows(label, f"{ds_label}/{a.split}", variant, names, layers, heads, sims)]
                g = unit_grid(sims, kinds, layers, heads, lay.num_layers, lay.num_heads)
                if np.isfinite(g).any():
                    grids[f"{ds_label} · {variant}"] = g
                if variant == a.variants[0] and np.isfinite(g[:, :lay.num_heads]).any():
                    profiles.setdefault(label, {})[ds_label] = layer_profile(g[:, :lay.num_heads])
                summary.append(summary_row(label, ds_label, variant, names, sims))
        if grids:
            xl = "head" + (f" (column {lay.num_heads} = MLP)" if "mlp" in kinds else "")
            plot_heatmaps(grids, out / f"similarity_{_safe(label)}.png",
                          f"{label}: spectral cosine vs reference {ref_label} (EVR {a.evr})", xlabel=xl)
    write_table(rows, out / "similarity", f"Spectral cosine per unit vs reference {ref_label}")
    write_table(summary, out / "similarity_summary", "Mean / min spectral cosine per model and dataset")
    print(markdown_table(summary))
    if profiles:
        plot_similarity_profiles(profiles, out / "similarity_profiles.png",
                                 f"mean head similarity vs {ref_label} ({a.variants[0]})")
    if len(head_bases) > 1 and a.cross_model == "profile":
        cross = profile_correlation(profiles)
        write_table(cross, out / "cross_model", "Correlation of the per-layer similarity profiles between models")
        print(markdown_table(cross))
    elif len(head_bases) > 1 and a.cross_model == "raw":
        log.warning("cross_model=raw compares principal directions of different models coordinate by coordinate: "
                    "meaningful only if the models share one output space (e.g. a model and a fine-tuned copy)")
        cross, cross_grids = raw_cross_model(head_bases, **similarity_options(cfg))
        for title, grid in cross_grids.items():
            la, lb = title.split(" × ")
            plot_heatmaps({title: grid}, out / f"cross_model_{_safe(la)}_{_safe(lb)}.png",
                          "raw spectral cosine between heads of two models", xlabel=f"head of {lb}",
                          ylabel=f"head of {la}")
        write_table(cross, out / "cross_model", "Raw cross-model spectral cosine (same output space assumed)")
    return 0


def run_coarse_selection(cfg, a, out: Path) -> int:
    score_rows, sel_rows, summary = [], [], []
    for label, mcfg in entry_nodes(a.models, "model", cfg):
        s = _session(cfg, a, mcfg)
        lay = s.backbone.layout
        head_idx = lay.indices("heads")
        others_idx = [i for i in range(len(lay)) if i not in set(head_idx)]
        names = [lay.names[i] for i in head_idx]
        enc_s, ds_s = s.encode(cfg.dataset, a.score_split, a.max_samples)
        enc_e, _ = s.encode(cfg.dataset, a.split, a.max_samples)
        head = s.classifier(cfg.dataset, ds_s.classnames, ds_s.templates)
        means = s.reference_bases()[0].mean.float() if "mean" in a.ablations else None     # [U, D]
        scores = cs.head_scores(a.scores, enc_s.units, enc_s.features, enc_s.labels, head_idx, head, a.evr,
                                s.progress, **similarity_options(cfg))
        orders = {k: cs.order_of(v) for k, v in scores.items()}
        score_rows += cs.score_rows(label, names, [lay.layers[i] for i in head_idx], [lay.heads[i] for i in head_idx],
                                    scores, orders)
        ks_labels = cs.keep_counts(len(head_idx), a.keep_top, a.keep_fractions)
        rows, curves = cs.selection_table(label, names, enc_e.units, enc_e.labels, head, head_idx, orders,
                                          cs.random_orders(len(head_idx), a.random_seeds), ks_labels, a.ablations,
                                          means, others_idx, a.others)
        sel_rows += rows
        full = top1_accuracy(head, enc_e.features, enc_e.labels)
        heads_only = top1_accuracy(head, cs.ablated_feature(enc_e.units, head_idx, range(len(head_idx))), enc_e.labels)
        plot_selection_curves(curves, [k for k, _ in ks_labels], len(head_idx),
                              out / f"coarse_selection_{_safe(label)}.png",
                              {"full model": full, "heads only": heads_only},
                              f"{label} on {cfg.dataset.name}/{a.split}: keep top-k heads (others: {a.others})")
        summary.append({"model": label, "dataset": cfg.dataset.name, "split": a.split, "heads": len(head_idx),
                        "full_model_acc": full, "heads_only_acc": heads_only,
                        **{f"best_head_{k}": names[int(o[0])] for k, o in orders.items()}})
    write_table(score_rows, out / "head_scores", "Head scores (computed on the score split)")
    write_table(sel_rows, out / "coarse_selection", "Accuracy when keeping the top-k heads")
    write_table(summary, out / "coarse_selection_summary", "Reference accuracies")
    table = cs.pivot(sel_rows)
    write_table(table, out / "coarse_selection_pivot", "Accuracy vs heads kept (random: mean ± std over seeds)")
    print(markdown_table(summary) + "\n" + markdown_table(table))
    return 0


def run_text_spans(cfg, a, out: Path) -> int:
    trained = run = None
    models = entry_nodes(a.models, "model", cfg)
    if a.run_dir:
        trained, run = lambda_report.load_run(Path(a.run_dir).expanduser())
        if a.models:
            log.warning("analysis.models is ignored with analysis.run_dir: the run's model (%s) is used", run.model.name)
        models = [(run.model.name, run.model)]
    texts_all = ts.load_dictionary(a.dictionary) if a.dictionary else ts.default_dictionary()
    pcs_rows, span_rows, lines = [], [], []
    for label, mcfg in models:
        s = _session(cfg, a, mcfg, run.conventions.units if run is not None else None)   # the run's units
        if not s.backbone.has_text:
            print(f"text_spans needs a text tower; model {label} ({mcfg.name}) has none", file=sys.stderr)
            return 2
        texts, dropped, msg = ts.usable_dictionary(texts_all, s.backbone, label, a.dictionary or "default (generated)")
        print(msg)
        lines += [f"# Text spans — {label}", "", msg, ""]
        save_text(texts, out / f"dictionary_{_safe(label)}.txt")
        if dropped:
            save_text(dropped, out / f"dictionary_dropped_{_safe(label)}.txt")
        if len(texts) < 2:
            from ..errors import UserError
            raise UserError(f"analysis.dictionary={a.dictionary}: {label} reads fewer than 2 of its lines ({msg})")
        atoms = ts.prepare_dictionary(ts.encode_texts(s.backbone, texts, s.device, progress=s.progress),
                                      a.center_dictionary)
        unit_basis, output_basis = s.reference_bases(run.pca if run is not None else None)
        idx = s.backbone.layout.indices(a.units)
        names = [s.backbone.layout.names[i] for i in idx]
        basis = unit_basis.select(idx).to(device="cpu")
        rows = ts.component_descriptions(basis, names, atoms, texts, a.n_components, a.n_descriptions, s.progress)
        spans = ts.unit_spans(basis, names, atoms, texts, a.n_descriptions, a.evr, s.progress)
        pcs_rows += [{"model": label, **r} for r in rows]
        span_rows += [{"model": label, **r} for r in spans]
        lines += ts.report_lines(names, rows, spans, a.n_components)
        if trained is not None:
            lines += lambda_report.run_report(trained, run, s, unit_basis, output_basis, atoms, texts, out,
                                              a.n_lambda, a.n_descriptions, a.run_dir)
    write_table(pcs_rows, out / "text_spans_pcs", "OMP descriptions of each unit's principal components")
    write_table(span_rows, out / "text_spans_units", "TextSpan/SOMP descriptions per unit")
    save_text(lines, out / "text_spans.md")
    print("\n".join(lines[:60]))
    return 0


RUNNERS = {
    "intrinsic_dimension": run_intrinsic_dimension,
    "spectral_similarity": run_spectral_similarity,
    "coarse_selection": run_coarse_selection,
    "text_spans": run_text_spans,
}
