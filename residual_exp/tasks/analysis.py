"""``task=analysis analysis=NAME``: the paper's analyses (glue: configs → backbones/data → library → files).

==========================  ======================================================================
``intrinsic_dimension``     per-unit linear dim (#PCs for 99%) vs TwoNN and their ratio; per-layer
                            profiles across depth for every model in ``analysis.models``
``spectral_similarity``     spectral cosine of unit bases: reference vs each of ``analysis.datasets``
                            (layers × heads heatmaps), and across models (``cross_model``)
``coarse_selection``        head scores, keep top k, zero/mean-ablate the rest, accuracy curves
``text_spans``              TextSpan/SOMP descriptions of head PCs (+ λ of a trained run)
==========================  ======================================================================

Outputs go to the run dir (``paths.output_dir``): ``*.csv`` + ``*.md`` tables and ``*.png``
plots; a short summary is printed.  The library code is in :mod:`residual_exp.analysis`.
Encodings, bases and classifiers come from the same content-keyed cache as ``task=train``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from ..analysis.config import ANALYSES

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parent.parent.parent / "conf"


# ------------------------------------------------------------------------- entry point
def valid_analyses() -> list[str]:
    """Names of the ``conf/analysis/*.yaml`` files (the valid ``analysis=NAME`` values)."""
    found = sorted(p.stem for p in (CONF_DIR / "analysis").glob("*.yaml"))
    return found or list(ANALYSES)


def analysis(cfg: DictConfig) -> int:
    """Run ``cfg.analysis`` (exit code: 0 ok, 2 no/unknown analysis chosen)."""
    a = cfg.get("analysis")
    names = valid_analyses()
    if a is None or not a.get("name"):
        print(f"task=analysis needs an analysis: add analysis=NAME, one of: {', '.join(names)}\n"
              f"  e.g. python -m residual_exp task=analysis analysis={names[0]}", file=sys.stderr)
        return 2
    runner = RUNNERS.get(a.name)
    if runner is None:
        print(f"analysis.name={a.name!r} is not an analysis; valid: {', '.join(names)}", file=sys.stderr)
        return 2
    from ..run import resolve_device, run_dir_of, seed_everything
    from ..cache import Cache
    seed_everything(cfg.seed)
    out = run_dir_of(cfg)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(cfg=cfg, a=a, out=out, device=resolve_device(cfg.device),
              cache=Cache(cfg.cache.dir, enabled=cfg.cache.enabled), progress=bool(a.progress))
    code = runner(ctx)
    print(f"analysis {a.name}: outputs in {out}")
    return int(code or 0)


@dataclass
class Ctx:
    cfg: Any
    a: Any
    out: Path
    device: str
    cache: Any
    progress: bool


# ------------------------------------------------------------------------- config helpers
def _group_node(group: str, name: str, schema, cfg) -> DictConfig:
    """``conf/<group>/<name>.yaml`` merged onto its schema, interpolations resolved against ``cfg.paths``."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.exists():
        valid = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise KeyError(f"{group} config {name!r} not found; valid: {', '.join(valid)}")
    raw = OmegaConf.load(path)
    raw.pop("defaults", None)
    node = OmegaConf.merge(OmegaConf.structured(schema), raw)
    ctx = OmegaConf.create({"paths": OmegaConf.to_container(cfg.paths, resolve=False), group: node})
    with open_dict(ctx):
        ctx.paths.output_dir = "."                      # never needed here; avoids the hydra: resolver
    return OmegaConf.create(OmegaConf.to_container(ctx, resolve=True)[group])


def _entry_node(entry, group: str, current, schema, cfg) -> tuple[str, DictConfig]:
    """``(label, node)`` for a ``models``/``datasets`` entry: a name or a dict of overrides."""
    if isinstance(entry, (DictConfig, dict)):
        d = OmegaConf.to_container(entry, resolve=True) if isinstance(entry, DictConfig) else dict(entry)
        if "name" not in d:
            raise ValueError(f"analysis {group} entry {d} needs a 'name'")
        label = d.pop("label", None)
        base = current if d["name"] == current.name else _group_node(group, d["name"], schema, cfg)
        node = OmegaConf.merge(base, d)
        if label is None:
            extra = ",".join(f"{k}={v}" for k, v in d.items() if k != "name")
            label = f"{d['name']}({extra})" if extra else d["name"]
        return str(label), node
    name = str(entry)
    return name, (current if name == current.name else _group_node(group, name, schema, cfg))


def _unique(labels: list[str]) -> list[str]:
    out: list[str] = []
    for l in labels:
        n, cand = 2, l
        while cand in out:
            cand, n = f"{l}#{n}", n + 1
        out.append(cand)
    return out


def model_nodes(cfg, entries) -> list[tuple[str, DictConfig]]:
    from ..config import ModelConfig
    items = [_entry_node(e, "model", cfg.model, ModelConfig, cfg) for e in (entries or [])] or [(cfg.model.name, cfg.model)]
    return list(zip(_unique([l for l, _ in items]), [n for _, n in items]))


def dataset_nodes(cfg, entries) -> list[tuple[str, DictConfig]]:
    from ..config import DatasetConfig
    items = [_entry_node(e, "dataset", cfg.dataset, DatasetConfig, cfg) for e in (entries or [])] \
        or [(cfg.dataset.name, cfg.dataset)]
    return list(zip(_unique([l for l, _ in items]), [n for _, n in items]))


# ------------------------------------------------------------------------- data helpers
def _build_backbone(ctx: Ctx, model_cfg):
    from ..encode import model_identity
    from ..run import frozen_backbone, seed_everything
    seed_everything(ctx.cfg.seed)      # random-init weights depend on the seed only (as the cache key says)
    return frozen_backbone(model_cfg, ctx.device), model_identity(model_cfg, ctx.cfg.seed)


def _split(ctx: Ctx, ds_cfg, split: str, transform, max_samples: int | None):
    """``(dataset, identity)``: the split, uniformly subsampled to ``max_samples`` (seeded)."""
    from ..data.registry import build_split
    from ..encode import subsample_split
    return subsample_split(build_split(ds_cfg, split, transform), ds_cfg, split, transform, max_samples,
                           ctx.cfg.seed)


def _batch_size(ctx: Ctx, ds_cfg) -> int:
    return int(ctx.a.get("batch_size") or ds_cfg.batch_size)


def _encode(ctx: Ctx, backbone, model_id, ds_cfg, split: str, max_samples: int | None):
    from ..encode import encode_split
    ds, ident = _split(ctx, ds_cfg, split, backbone.transform, max_samples)
    enc = encode_split(backbone, ds, ctx.cache, {"model": model_id, "dataset": ident}, ctx.device,
                       _batch_size(ctx, ds_cfg), ds_cfg.num_workers, ctx.cfg.cache.dtype,
                       ctx.cfg.cache.memory_budget_gb, ctx.progress)
    return enc, ds


def _bases(ctx: Ctx, backbone, model_id, ds_cfg, split: str, max_samples: int | None):
    from ..encode import fit_bases
    ds, ident = _split(ctx, ds_cfg, split, backbone.transform, max_samples)
    return fit_bases(backbone, ds, ctx.cache, {"model": model_id, "dataset": ident}, ctx.device,
                     _batch_size(ctx, ds_cfg), ds_cfg.num_workers, ctx.progress)


def _reference(ctx: Ctx, cfg=None, pca=None, dataset=None):
    """``(dataset node, split, max_samples)`` of the reference set, as ``task=train`` picks it."""
    from ..config import DatasetConfig
    cfg = cfg or ctx.cfg
    pca = pca or cfg.pca
    dataset = dataset or cfg.dataset
    node = dataset if pca.reference is None or pca.reference == dataset.name else \
        _group_node("dataset", pca.reference, DatasetConfig, ctx.cfg)
    return node, pca.split, pca.max_samples


def _classifier(ctx: Ctx, backbone, model_id, ds_cfg, classnames, templates):
    """The frozen classifier of ``task=train``: text centroids, or train-split image prototypes."""
    from ..classifiers import frozen_classifier
    return frozen_classifier(backbone, classnames, templates, ctx.cache, model_id,
                             lambda: _encode(ctx, backbone, model_id, ds_cfg, "train", None)[0],
                             ctx.device, ctx.progress)


def _layout_cols(layout, idx):
    return ([layout.names[i] for i in idx], [layout.kinds[i] for i in idx], [layout.layers[i] for i in idx],
            [layout.heads[i] for i in idx])


# ------------------------------------------------------------------------- 1. intrinsic dimension
def run_intrinsic_dimension(ctx: Ctx) -> int:
    from ..analysis.intrinsic_dimension import layer_profiles, unit_dimensions
    from ..analysis.plots import markdown_table, plot_heatmaps, plot_id_profiles, write_table
    from ..analysis.similarity import grid_of
    a = ctx.a
    all_rows, profiles, grids = [], {}, {}
    for label, mcfg in model_nodes(ctx.cfg, a.models):
        backbone, model_id = _build_backbone(ctx, mcfg)
        layout = backbone.layout
        enc, _ = _encode(ctx, backbone, model_id, ctx.cfg.dataset, a.split, a.max_samples)
        idx = layout.indices(a.units)
        rows = unit_dimensions(enc.units, layout.names, idx, layout.kinds, layout.layers, layout.heads,
                               threshold=a.variance_threshold, discard_fraction=a.discard_fraction,
                               estimator=a.estimator, chunk_size=a.chunk_size, progress=ctx.progress,
                               desc=f"intrinsic dimension {label}")
        rows = [{"model": label, "dataset": ctx.cfg.dataset.name, "split": a.split, **r} for r in rows]
        all_rows += rows
        profiles[label] = [{"model": label, **p} for p in layer_profiles(rows)]
        heads = [r for r in rows if r["kind"] == "head"]
        if heads:
            L, H = layout.num_layers, layout.num_heads
            for key in ("linear_dim", "twonn"):
                grids[f"{label} · {key}"] = grid_of([r[key] for r in heads], [r["layer"] for r in heads],
                                                    [r["head"] for r in heads], L, H)
        del backbone
    write_table(all_rows, ctx.out / "intrinsic_dimension", "Intrinsic dimension per unit")
    prof_rows = [r for rows in profiles.values() for r in rows]
    write_table(prof_rows, ctx.out / "id_profiles", "Per-layer intrinsic dimension (mean ± std over heads)")
    if prof_rows:
        plot_id_profiles(profiles, ctx.out / "id_profiles.png", a.variance_threshold)
    if grids:
        vmax = max(float(np.nanmax(g)) for g in grids.values() if np.isfinite(g).any())
        plot_heatmaps(grids, ctx.out / "id_heads.png", "per-head linear dimension and TwoNN", vmin=0, vmax=vmax)
    print(markdown_table(prof_rows, ["model", "layer", "n_units", "linear_mean", "twonn_mean", "ratio_mean"]))
    return 0


# ------------------------------------------------------------------------- 2. spectral similarity
def run_spectral_similarity(ctx: Ctx) -> int:
    from ..analysis.plots import markdown_table, plot_heatmaps, plot_similarity_profiles, write_table
    from ..analysis.similarity import (cross_model_grid, dataset_similarity, grid_of, layer_profile,
                                       profile_correlation, similarity_rows)
    a = ctx.a
    if a.cross_model not in ("profile", "raw", "none"):
        raise ValueError(f"analysis.cross_model={a.cross_model!r}; valid: profile, raw, none")
    bad = [v for v in a.variants if v not in ("weighted", "unweighted")]
    if bad or not a.variants:
        raise ValueError(f"analysis.variants={list(a.variants)}; valid: weighted, unweighted")
    ref_node, ref_split, ref_max = _reference(ctx)
    if a.reference is not None:
        from ..config import DatasetConfig
        ref_node = ctx.cfg.dataset if a.reference == ctx.cfg.dataset.name else \
            _group_node("dataset", a.reference, DatasetConfig, ctx.cfg)
    ref_split = a.reference_split or ref_split
    ref_max = a.reference_max_samples if a.reference_max_samples is not None else ref_max
    ref_label = f"{ref_node.name}/{ref_split}"
    datasets = dataset_nodes(ctx.cfg, a.datasets)
    rows, profiles, head_bases, summary = [], {}, {}, []
    for label, mcfg in model_nodes(ctx.cfg, a.models):
        backbone, model_id = _build_backbone(ctx, mcfg)
        layout = backbone.layout
        idx = layout.indices(a.units)
        names, kinds, layers, heads = _layout_cols(layout, idx)
        L, H = layout.num_layers, layout.num_heads
        ref_basis, _ = _bases(ctx, backbone, model_id, ref_node, ref_split, ref_max)
        head_idx = layout.indices("heads")
        head_bases[label] = (ref_basis.select(head_idx).prune(evr=a.evr).compact(), layout)
        grids = {}
        for ds_label, ds_cfg in datasets:
            basis, _ = _bases(ctx, backbone, model_id, ds_cfg, a.split, a.max_samples)
            for variant in a.variants:
                sims = dataset_similarity(ref_basis, basis, idx, variant == "weighted", a.evr)
                rows += [{"reference": ref_label, **r} for r in
                         similarity_rows(label, f"{ds_label}/{a.split}", variant, names, layers, heads, sims)]
                # heads in [L, H]; MLPs (if selected) as an extra last column
                has_mlp = any(k == "mlp" for k in kinds)
                g = np.full((L, H + int(has_mlp)), np.nan)
                for v, k, l, h in zip(sims, kinds, layers, heads):
                    if k == "head":
                        g[l, h] = v
                    elif k == "mlp":
                        g[l, H] = v
                if np.isfinite(g).any():
                    grids[f"{ds_label} · {variant}"] = g
                if variant == a.variants[0]:
                    hg = g[:, :H]
                    if np.isfinite(hg).any():
                        profiles.setdefault(label, {})[ds_label] = layer_profile(hg)
                summary.append({"model": label, "dataset": ds_label, "variant": variant,
                                "mean": float(np.mean(sims)) if len(sims) else float("nan"),
                                "min": float(np.min(sims)) if len(sims) else float("nan"),
                                "min_unit": names[int(np.argmin(sims))] if len(sims) else ""})
        if grids:
            xl = "head" + (f" (column {H} = MLP)" if any(k == "mlp" for k in kinds) else "")
            plot_heatmaps(grids, ctx.out / f"similarity_{_safe(label)}.png",
                          f"{label}: spectral cosine vs reference {ref_label} (EVR {a.evr})", xlabel=xl)
        del backbone
    write_table(rows, ctx.out / "similarity", f"Spectral cosine per unit vs reference {ref_label}")
    write_table(summary, ctx.out / "similarity_summary", "Mean / min spectral cosine per model and dataset")
    print(markdown_table(summary))
    if profiles:
        plot_similarity_profiles(profiles, ctx.out / "similarity_profiles.png",
                                 f"mean head similarity vs {ref_label} ({a.variants[0]})")
    if len(head_bases) > 1 and a.cross_model != "none":
        _cross_model(ctx, a, profiles, head_bases)
    return 0


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def _cross_model(ctx: Ctx, a, profiles, head_bases) -> None:
    from ..analysis.plots import markdown_table, plot_heatmaps, write_table
    from ..analysis.similarity import cross_model_grid, profile_correlation
    if a.cross_model == "profile":
        rows = profile_correlation(profiles)
        write_table(rows, ctx.out / "cross_model", "Correlation of the per-layer similarity profiles between models")
        print(markdown_table(rows))
        return
    log.warning("cross_model=raw compares principal directions of different models coordinate by coordinate: "
                "meaningful only if the models share one output space (e.g. a model and a fine-tuned copy)")
    labels = list(head_bases)
    rows = []
    for i, la in enumerate(labels):
        for lb in labels[i + 1:]:
            (ba, lay_a), (bb, lay_b) = head_bases[la], head_bases[lb]
            if ba.dim != bb.dim:
                rows.append({"model_a": la, "model_b": lb, "note": f"output dims differ ({ba.dim} vs {bb.dim}): "
                             "different spaces, not compared"})
                continue
            grid = cross_model_grid(ba, range(ba.num_units), bb, range(bb.num_units), True, None)
            plot_heatmaps({f"{la} × {lb}": grid}, ctx.out / f"cross_model_{_safe(la)}_{_safe(lb)}.png",
                          "raw spectral cosine between heads of two models", xlabel=f"head of {lb}",
                          ylabel=f"head of {la}")
            names_a = [n for n, k in zip(lay_a.names, lay_a.kinds) if k == "head"]
            names_b = [n for n, k in zip(lay_b.names, lay_b.kinds) if k == "head"]
            for r, na in enumerate(names_a):
                j = int(np.argmax(grid[r]))
                same = names_b.index(na) if na in names_b else None
                rows.append({"model_a": la, "model_b": lb, "unit_a": na, "best_unit_b": names_b[j],
                             "best": float(grid[r, j]), "same_name": float(grid[r, same]) if same is not None else None})
    write_table(rows, ctx.out / "cross_model", "Raw cross-model spectral cosine (same output space assumed)")


# ------------------------------------------------------------------------- 3. coarse selection
SCORES = ("zero_shot", "text_alignment", "output_correlation")


def run_coarse_selection(ctx: Ctx) -> int:
    from ..analysis import coarse_selection as cs
    from ..analysis.plots import markdown_table, plot_selection_curves, write_table
    from ..spectral import StreamingPCA
    a = ctx.a
    bad = [s for s in a.scores if s not in SCORES]
    if bad:
        raise ValueError(f"analysis.scores: unknown {bad}; valid: {', '.join(SCORES)} (random: analysis.random_seeds)")
    bad = [s for s in a.ablations if s not in ("zero", "mean")]
    if bad or a.others not in ("drop", "add"):
        raise ValueError(f"analysis.ablations must be zero/mean (got {list(a.ablations)}), "
                         f"analysis.others drop/add (got {a.others!r})")
    ds_cfg = ctx.cfg.dataset
    score_rows, sel_rows, summary = [], [], []
    for label, mcfg in model_nodes(ctx.cfg, a.models):
        backbone, model_id = _build_backbone(ctx, mcfg)
        layout = backbone.layout
        head_idx = layout.indices("heads")
        others_idx = [i for i in range(len(layout)) if i not in set(head_idx)]
        names = [layout.names[i] for i in head_idx]
        enc_s, ds_s = _encode(ctx, backbone, model_id, ds_cfg, a.score_split, a.max_samples)
        enc_e, _ = _encode(ctx, backbone, model_id, ds_cfg, a.split, a.max_samples)
        head = _classifier(ctx, backbone, model_id, ds_cfg, ds_s.classnames, ds_s.templates)
        means = None
        if "mean" in a.ablations:
            ref_node, ref_split, ref_max = _reference(ctx)
            means = _bases(ctx, backbone, model_id, ref_node, ref_split, ref_max)[0].mean.float()   # [U, D]
        scores: dict[str, np.ndarray] = {}
        if "zero_shot" in a.scores:
            scores["zero_shot"] = cs.head_zero_shot(enc_s.units, enc_s.labels, head_idx, head, ctx.progress)
        if "text_alignment" in a.scores:
            pca = StreamingPCA(len(head_idx), backbone.output_dim)
            for i in range(0, len(enc_s), 1024):
                pca.update(torch.from_numpy(np.asarray(enc_s.units[i:i + 1024][:, head_idx])))   # [b, H, D]
            scores["text_alignment"] = cs.text_alignment(pca.finalize(), head.weight, True, a.evr)
        if "output_correlation" in a.scores:
            scores["output_correlation"] = cs.output_correlation(enc_s.units, enc_s.features, head_idx, ctx.progress)
        orders = {s: cs.order_of(v) for s, v in scores.items()}
        for p, n in enumerate(names):
            r = {"model": label, "unit": n, "layer": layout.layers[head_idx[p]], "head": layout.heads[head_idx[p]]}
            for s, v in scores.items():
                r[s] = float(v[p])
                r[f"{s}_rank"] = int(np.where(orders[s] == p)[0][0]) + 1
            score_rows.append(r)
        ks_labels = cs.keep_counts(len(head_idx), a.keep_top, a.keep_fractions)
        ks = [k for k, _ in ks_labels]
        lab = dict(ks_labels)
        randoms = cs.random_orders(len(head_idx), a.random_seeds)
        curves: dict[str, dict[str, np.ndarray]] = {}
        for abl in a.ablations:
            curves[abl] = {}
            todo = [(s, None, o) for s, o in orders.items()] + [("random", seed, o) for seed, o in randoms.items()]
            rand_acc = []
            for s, seed, order in todo:
                acc = cs.selection_curve(enc_e.units, enc_e.labels, head, head_idx, order, ks, abl, means,
                                         others_idx, a.others)
                if s == "random":
                    rand_acc.append(acc)
                else:
                    curves[abl][s] = acc[None]
                for k, v in zip(ks, acc):
                    sel_rows.append({"model": label, "ablation": abl, "others": a.others, "score": s,
                                     "seed": seed if seed is not None else "", "k": k, "keep": lab[k],
                                     "n_ablated": len(head_idx) - k, "accuracy": float(v),
                                     "kept": " ".join(names[int(p)] for p in order[:k])})
            if rand_acc:
                curves[abl]["random"] = np.stack(rand_acc)
        full = cs.accuracy(head, torch.from_numpy(np.asarray(enc_e.features)).float(), enc_e.labels)
        heads_only = cs.accuracy(head, cs.ablated_feature(enc_e.units, head_idx, range(len(head_idx))), enc_e.labels)
        refs = {"full model": full, "heads only": heads_only}
        plot_selection_curves(curves, ks, len(head_idx), ctx.out / f"coarse_selection_{_safe(label)}.png", refs,
                              f"{label} on {ds_cfg.name}/{a.split}: keep top-k heads (others: {a.others})")
        summary.append({"model": label, "dataset": ds_cfg.name, "split": a.split, "heads": len(head_idx),
                        "full_model_acc": full, "heads_only_acc": heads_only,
                        **{f"best_head_{s}": names[int(orders[s][0])] for s in orders}})
        del backbone
    write_table(score_rows, ctx.out / "head_scores", "Head scores (computed on the score split)")
    write_table(sel_rows, ctx.out / "coarse_selection", "Accuracy when keeping the top-k heads")
    write_table(summary, ctx.out / "coarse_selection_summary", "Reference accuracies")
    print(markdown_table(summary))
    pivot = {}
    for r in sel_rows:
        key = (r["model"], r["ablation"], r["k"], r["keep"])
        pivot.setdefault(key, {}).setdefault(r["score"], []).append(r["accuracy"])
    table = [{"model": m, "ablation": ab, "k": k, "keep": kp,
              **{s: (f"{np.mean(v):.3f}±{np.std(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}") for s, v in d.items()}}
             for (m, ab, k, kp), d in pivot.items()]
    write_table(table, ctx.out / "coarse_selection_pivot", "Accuracy vs heads kept (random: mean ± std over seeds)")
    print(markdown_table(table))
    return 0


# ------------------------------------------------------------------------- 4. text spans
def _load_run(ctx: Ctx, run_dir: Path):
    """The trained run's λ file and its (resolved) model/dataset/pca/method config nodes."""
    from safetensors import safe_open
    from ..config import DatasetConfig, MethodConfig, ModelConfig, PCAConfig
    lam_path, cfg_path = run_dir / "lambda.safetensors", run_dir / ".hydra" / "config.yaml"
    for p in (lam_path, cfg_path):
        if not p.is_file():
            raise FileNotFoundError(f"analysis.run_dir={str(run_dir)!r}: missing {p.name} "
                                    "(a run dir of `python -m residual_exp method=residual_*` holds "
                                    "lambda.safetensors and .hydra/config.yaml)")
    with safe_open(str(lam_path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    rc = OmegaConf.load(cfg_path)
    nodes = {"paths": OmegaConf.to_container(rc.get("paths", ctx.cfg.paths), resolve=False)}
    nodes["paths"]["output_dir"] = str(run_dir)
    for k in ("model", "dataset", "pca", "method"):
        nodes[k] = OmegaConf.to_container(rc[k], resolve=False)
    nodes["seed"] = rc.get("seed", 0)
    res = OmegaConf.to_container(OmegaConf.create(nodes), resolve=True)
    run = OmegaConf.create({
        "model": OmegaConf.merge(OmegaConf.structured(ModelConfig), res["model"]),
        "dataset": OmegaConf.merge(OmegaConf.structured(DatasetConfig), res["dataset"]),
        "pca": OmegaConf.merge(OmegaConf.structured(PCAConfig), res["pca"]),
        "method": OmegaConf.merge(OmegaConf.structured(MethodConfig), res["method"]),
        "seed": int(res["seed"])})
    return tensors, meta, run


def run_text_spans(ctx: Ctx) -> int:
    from ..analysis import text_spans as ts
    from ..analysis.plots import save_text, write_table
    a = ctx.a
    run_dir = Path(a.run_dir).expanduser() if a.run_dir else None
    run = None
    if run_dir is not None:
        tensors, meta, run = _load_run(ctx, run_dir)
        if a.models:
            log.warning("analysis.models is ignored with analysis.run_dir: the run's model (%s) is used", run.model.name)
        models = [(run.model.name, run.model)]
    else:
        models = model_nodes(ctx.cfg, a.models)
    texts_all = ts.load_dictionary(a.dictionary) if a.dictionary else ts.default_dictionary()
    src = a.dictionary or "default (generated)"
    pcs_rows, span_rows, lines = [], [], []
    for label, mcfg in models:
        backbone, model_id = _build_backbone(ctx, mcfg)
        if not backbone.has_text:
            print(f"text_spans needs a text tower; model {label} ({mcfg.name}) has none", file=sys.stderr)
            return 2
        tok = getattr(backbone, "_tokenizer", None)
        texts, dropped = ts.filter_known(texts_all, getattr(tok, "unknown_words", None))
        msg = (f"{label}: dictionary {src}: {len(texts_all)} descriptions, {len(dropped)} dropped "
               f"(words unknown to the tokenizer), {len(texts)} kept")
        print(msg)
        lines += [f"# Text spans — {label}", "", msg, ""]
        save_text(texts, ctx.out / f"dictionary_{_safe(label)}.txt")
        if dropped:
            save_text(dropped, ctx.out / f"dictionary_dropped_{_safe(label)}.txt")
        if len(texts) < 2:
            print(f"{label}: fewer than 2 usable descriptions; nothing to decompose onto", file=sys.stderr)
            return 1
        atoms = ts.prepare_dictionary(ts.encode_texts(backbone, texts, ctx.device, progress=ctx.progress),
                                      a.center_dictionary)
        layout = backbone.layout
        rcfg = run if run is not None else ctx.cfg
        ref_node, ref_split, ref_max = _reference(ctx, rcfg, rcfg.pca, rcfg.dataset)
        unit_basis, output_basis = _bases(ctx, backbone, model_id, ref_node, ref_split, ref_max)
        idx = layout.indices(a.units)
        names = [layout.names[i] for i in idx]
        basis = unit_basis.select(idx).to(device="cpu")
        rows = ts.component_descriptions(basis, names, atoms, texts, a.n_components, a.n_descriptions, ctx.progress)
        spans = ts.unit_spans(basis, names, atoms, texts, a.n_descriptions, a.evr, ctx.progress)
        pcs_rows += [{"model": label, **r} for r in rows]
        span_rows += [{"model": label, **r} for r in spans]
        lines += ["## Per unit (TextSpan/SOMP on the scaled PCs)", ""]
        for n in names:
            sel = [r for r in spans if r["unit"] == n]
            if sel:
                lines.append(f"- **{n}** ({sel[0]['n_pcs']} PCs): " + "; ".join(
                    f"{r['description']} ({r['explained']:.0%})" for r in sel))
        lines += ["", "## Per principal component (OMP; sign = end of the PC)", ""]
        for n in names:
            for pc in range(a.n_components):
                sel = [r for r in rows if r["unit"] == n and r["pc"] == pc]
                if sel:
                    lines.append(f"- {n} PC{pc} (EVR {sel[0]['evr']:.2f}): " + ", ".join(
                        f"{'+' if r['cosine'] >= 0 else '−'}{r['description']}" for r in sel))
        lines.append("")
        if run is not None:
            lines += _lambda_report(ctx, a, tensors, meta, run, backbone, unit_basis, output_basis, atoms, texts)
        del backbone
    write_table(pcs_rows, ctx.out / "text_spans_pcs", "OMP descriptions of each unit's principal components")
    write_table(span_rows, ctx.out / "text_spans_units", "TextSpan/SOMP descriptions per unit")
    save_text(lines, ctx.out / "text_spans.md")
    print("\n".join(lines[:60]))
    return 0


def _lambda_report(ctx: Ctx, a, tensors, meta, run, backbone, unit_basis, output_basis, atoms, texts) -> list[str]:
    """Most amplified / suppressed components of a trained run, with their descriptions."""
    from ..analysis import text_spans as ts
    from ..analysis.plots import plot_lambda_gains, write_table
    from ..methods import build_adapter
    layout = backbone.layout
    units = json.loads(meta.get("units", "[]"))
    method = meta.get("method", run.method.name)
    lam = tensors["lambda"].double()
    lines = [f"# Trained run: {method} on {run.dataset.name} ({a.run_dir})", ""]
    if "mask" not in tensors or lam.ndim != 2:
        # residual_coarse: one scalar per unit, no components
        order = torch.argsort(lam.abs(), descending=True).tolist()
        rows = [{"unit": units[i], "lambda": float(lam[i])} for i in order]
        write_table(rows, ctx.out / "lambda_units", f"{method}: λ per unit")
        lines += [f"{method} trains one scalar per unit (no components to describe). Largest |λ|: "
                  + ", ".join(f"{r['unit']} ({r['lambda']:+.2f})" for r in rows[:a.n_lambda]), ""]
        return lines
    mask = tensors["mask"].bool()
    if units == ["output"]:
        basis = output_basis
    else:
        basis = unit_basis.select([layout.index(n) for n in units])
    basis = basis.prune(evr=run.pca.evr, k=run.pca.k).compact().to(device="cpu")
    if tuple(basis.mask.shape) != tuple(mask.shape):
        raise ValueError(f"the run's λ is {tuple(mask.shape)} but the refitted basis is {tuple(basis.mask.shape)}: "
                         "the run used other bases (pca.* settings or reference data) than can be rebuilt here")
    comps = tensors.get("eigen_components")
    if comps is not None and comps.numel():
        if comps.shape == basis.components.shape and not torch.allclose(
                comps.double().abs(), basis.components.double().abs(), atol=1e-3):
            log.warning("refitted PCA components differ from the run's stored ones; using the stored ones")
        if comps.shape == basis.components.shape:
            basis = dataclasses.replace(basis, components=comps.to(basis.components.dtype))
    lam_init = None
    try:   # the seeded initial λ, rebuilt exactly as task=train built it (Δλ = what training changed)
        adapter = build_adapter(run.method, run.pca, layout, backbone.output_dim, unit_basis, output_basis,
                                backbone=backbone, seed=run.seed)
        if hasattr(adapter, "lambdas") and tuple(adapter.lambdas().shape) == tuple(lam.shape):
            lam_init = adapter.lambdas().detach().double().cpu()
    except Exception as e:  # pragma: no cover - diagnostic only
        log.warning("could not rebuild the initial λ: %s", e)
    eig = basis.eigenvalues.double()
    comp_rows = ts.lambda_components(lam, mask, eig, basis.explained_variance_ratio, units, lam_init)
    gains = ts.unit_gains(lam, mask, eig)
    unit_rows = [{"unit": n, "kind": layout.kinds[layout.index(n)] if n in layout.names else "output",
                  "gain": float(g), "n_components": int(mask[i].sum()),
                  **({"gain_init": float(ts.unit_gains(lam_init, mask, eig)[i])} if lam_init is not None else {})}
                 for i, (n, g) in enumerate(zip(units, gains.tolist()))]
    write_table(sorted(unit_rows, key=lambda r: -np.nan_to_num(r["gain"], nan=-1)), ctx.out / "lambda_units",
                "Per-unit gain sqrt(Σ λ² e / Σ e) of the trained λ")
    plot_lambda_gains(units, gains.tolist(), ctx.out / "lambda_gains.png",
                      f"{method} on {run.dataset.name}: per-unit gain of λ",
                      ts.unit_gains(lam_init, mask, eig).tolist() if lam_init is not None else None)
    dct = atoms.double().numpy()

    def describe(r, n=3):
        s = units.index(r["unit"])
        phi = basis.components[s, r["pc"]].double().numpy()
        res = ts.somp(phi[None], dct, n)
        return ", ".join(f"{'+' if phi @ dct[j] >= 0 else '−'}{texts[j]}" for j in res.support)

    # rank by the change of the component's variance share (λ² − λ_init²)·evr: what training added or
    # removed (λ_init = 1, i.e. "unchanged", when the initial λ cannot be rebuilt)
    for r in comp_rows:
        r.setdefault("delta_share", r["share"] - r["evr"])
    amplified = sorted(comp_rows, key=lambda r: -r["delta_share"])[:a.n_lambda]
    suppressed = sorted(comp_rows, key=lambda r: r["delta_share"])[:a.n_lambda]
    for r in amplified + suppressed:
        r["descriptions"] = describe(r)
    write_table([dict(r, which="amplified") for r in amplified] + [dict(r, which="suppressed") for r in suppressed],
                ctx.out / "lambda_components", f"{method}: most amplified / suppressed components")
    write_table(comp_rows, ctx.out / "lambda_all_components", f"{method}: λ of every kept component")
    heads_sorted = [r for r in sorted(unit_rows, key=lambda r: -np.nan_to_num(r["gain"], nan=-1))
                    if r["kind"] == "head"]
    lines += [f"Units ranked by gain (variance-weighted RMS λ): " + ", ".join(
        f"{r['unit']} {r['gain']:.2f}" for r in sorted(unit_rows, key=lambda r: -np.nan_to_num(r['gain'], nan=-1))[:8]), ""]
    if heads_sorted:
        top = heads_sorted[0]["unit"]
        s = units.index(top)
        order = torch.argsort((lam[s].abs() * eig[s].clamp_min(0).sqrt()) * mask[s], descending=True)[:3].tolist()
        lines += [f"Head with the largest gain: **{top}** (gain {heads_sorted[0]['gain']:.2f}); its components with "
                  "the largest |λ|·σ:"]
        for k in order:
            r = {"unit": top, "pc": k}
            lines.append(f"- PC{k} (EVR {float(basis.explained_variance_ratio[s, k]):.2f}, λ {float(lam[s, k]):+.2f}): "
                         + describe(r, a.n_descriptions))
        lines.append("")
    init_note = "λ_init rebuilt from the run's seed" if lam_init is not None else "λ_init taken as 1"
    fmt = lambda r: (f"- {r['unit']} PC{r['pc']} (EVR {r['evr']:.3f}, λ {r['lambda']:+.2f}"
                     + (f" from {r['lambda_init']:+.2f}" if "lambda_init" in r else "")
                     + f", Δshare {r['delta_share']:+.3f}): {r['descriptions']}")
    lines += [f"## Most amplified components (largest Δshare = (λ² − λ_init²)·EVR; {init_note})", ""]
    lines += [fmt(r) for r in amplified]
    lines += ["", "## Most suppressed components (most negative Δshare)", ""]
    lines += [fmt(r) for r in suppressed]
    lines.append("")
    return lines


RUNNERS = {
    "intrinsic_dimension": run_intrinsic_dimension,
    "spectral_similarity": run_spectral_similarity,
    "coarse_selection": run_coarse_selection,
    "text_spans": run_text_spans,
}
