"""Coarse head selection: keep counts, scores, ablation bookkeeping, 100% reproduces heads-only."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from residual_exp.analysis import coarse_selection as cs
from residual_exp.classifiers import ClassifierHead, top1_accuracy
from residual_exp.decompose.units import UnitLayout
from residual_exp.spectral import StreamingPCA


@pytest.fixture(scope="module")
def data():
    """A toy decomposition: head L0H1 carries the class signal, the others are noise."""
    gen = torch.Generator().manual_seed(0)
    layout = UnitLayout.vit(2, 3)
    n, d, c = 300, 12, 4
    labels = torch.randint(0, c, (n,), generator=gen)
    centroids = F.normalize(torch.randn(c, d, generator=gen), dim=-1)          # [C, D]
    units = torch.randn(n, len(layout), d, generator=gen) * 0.3                  # [N, U, D]
    units += torch.randn(len(layout), d, generator=gen)                          # per-unit means
    signal = layout.index("L0H1")
    units[:, signal] += 3.0 * centroids[labels]
    head = ClassifierHead(centroids, 100.0)
    means = units.mean(0) + 0.05 * torch.randn(len(layout), d, generator=gen)   # "reference" means
    return layout, units.numpy(), labels.numpy(), head, centroids, means, signal


def test_keep_counts() -> None:
    ks = cs.keep_counts(16)
    assert ks == [(1, "top1/1%/5%"), (2, "10%"), (4, "25%"), (8, "50%"), (12, "75%"), (16, "100%")]
    ks = cs.keep_counts(144, top=[1, 3], fractions=[0.01, 0.5])
    assert ks == [(1, "top1/1%"), (3, "top3"), (72, "50%")]
    with pytest.raises(ValueError):
        cs.keep_counts(10, fractions=[0.0])


def test_scores_find_the_signal_head(data) -> None:
    layout, units, labels, head, centroids, means, signal = data
    head_idx = layout.indices("heads")
    p = head_idx.index(signal)
    zs = cs.head_zero_shot(units, labels, head_idx, head)
    assert zs.shape == (6,) and int(np.argmax(zs)) == p and zs[p] > 0.9
    pca = StreamingPCA(len(head_idx), units.shape[2])
    pca.update(torch.from_numpy(units[:, head_idx]))
    ta = cs.text_alignment(pca.finalize(), centroids, weighted=True, evr=0.9)
    assert ta.shape == (6,) and int(np.argmax(ta)) == p and (ta >= 0).all() and (ta <= 1).all()
    oc = cs.output_correlation(units, units.sum(1), head_idx)
    assert int(np.argmax(oc)) == p
    assert cs.order_of(zs)[0] == p
    assert cs.order_of([0.1, np.nan, 0.3]).tolist() == [2, 0, 1]
    r = cs.random_orders(6, [0, 1])
    assert sorted(r[0].tolist()) == list(range(6)) and not np.array_equal(r[0], r[1])


def test_keeping_all_heads_with_zero_ablation_is_heads_only(data) -> None:
    layout, units, labels, head, _, means, _ = data
    head_idx = layout.indices("heads")
    others = [i for i in range(len(layout)) if i not in head_idx]
    heads_only = torch.from_numpy(units[:, head_idx].sum(1))
    acc_heads = top1_accuracy(head, heads_only, labels)
    order = np.arange(len(head_idx))
    for abl in ("zero", "mean"):
        acc = cs.selection_curve(units, labels, head, head_idx, order, [len(head_idx)], abl, means)
        assert acc[0] == acc_heads                     # nothing ablated: the ablation kind does not matter
    full = cs.selection_curve(units, labels, head, head_idx, order, [len(head_idx)], "zero", means, others, "add")
    assert full[0] == top1_accuracy(head, torch.from_numpy(units.sum(1)), labels)


def test_ablation_bookkeeping_matches_the_explicit_formula(data) -> None:
    layout, units, labels, head, _, means, _ = data
    head_idx = layout.indices("heads")
    others = [i for i in range(len(layout)) if i not in head_idx]
    order = np.array([4, 1, 5, 0, 3, 2])
    ks = [0, 1, 2, 3, 6]
    for abl in ("zero", "mean"):
        for oth in ("drop", "add"):
            curve = cs.selection_curve(units, labels, head, head_idx, order, ks, abl, means, others, oth)
            for k, acc in zip(ks, curve):
                kept = order[:k]
                f = cs.ablated_feature(units, head_idx, kept, abl, means, others, oth)
                # the explicit sum, written out
                ref = np.zeros((units.shape[0], units.shape[2]), np.float64)
                for p, u in enumerate(head_idx):
                    if p in set(kept.tolist()):
                        ref += units[:, u]
                    elif abl == "mean":
                        ref += means[u].numpy()
                if oth == "add":
                    ref += units[:, others].sum(1)
                assert np.allclose(f.numpy(), ref, atol=1e-4)
                assert acc == top1_accuracy(head, f, labels)
    with pytest.raises(ValueError):
        cs.selection_curve(units, labels, head, head_idx, order, [1], "mean", None)


def test_coarse_selection_end_to_end(make_cfg, tmp_path) -> None:
    from tests.conftest import TINY_DATA
    from residual_exp.run import run
    cfg = make_cfg(["task=analysis", "analysis=coarse_selection", "model.pretrained=null", "logger=none",
                    "analysis.progress=false", "analysis.random_seeds=[0,1,2]", *TINY_DATA])
    assert run(cfg) == 0
    out = tmp_path / "run"
    for f in ("head_scores.csv", "coarse_selection.csv", "coarse_selection.md", "coarse_selection_summary.csv",
              "coarse_selection_pivot.md", "coarse_selection_tiny_clip.png"):
        assert (out / f).is_file(), f
    rows = list(csv.DictReader(open(out / "coarse_selection.csv")))
    summary = next(csv.DictReader(open(out / "coarse_selection_summary.csv")))
    ks = [1, 2, 4, 8, 12, 16]
    # 2 ablations × (3 scores + 3 random seeds) × 6 keep counts
    assert len(rows) == 2 * 6 * len(ks)
    for r in rows:
        kept = r["kept"].split()
        assert len(kept) == int(r["k"]) == 16 - int(r["n_ablated"]) and len(set(kept)) == len(kept)
    for r in rows:
        if r["k"] == "16" and r["ablation"] == "zero":
            assert float(r["accuracy"]) == pytest.approx(float(summary["heads_only_acc"]))
    scores = list(csv.DictReader(open(out / "head_scores.csv")))
    assert len(scores) == 16 and sorted(int(s["zero_shot_rank"]) for s in scores) == list(range(1, 17))
