"""Stored stratified splits: deterministic, stratified, disjoint, reused, mismatch detected."""
from __future__ import annotations

import json
import threading
from collections import Counter

import numpy as np
import pytest

from residual_exp.data import splits
from residual_exp.data.splits import SplitMismatchError, load_or_create, stratified_partition


def _targets(seed=0, n_classes=7, n=523):
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_classes, size=n).tolist()       # unbalanced classes


@pytest.mark.parametrize("fractions", [{"val": 0.1}, {"val": 0.2}, {"val": 0.1, "test": 0.1}])
def test_partition_is_deterministic_stratified_and_complete(fractions):
    y = _targets()
    a = stratified_partition(y, fractions)
    assert a == stratified_partition(y, fractions)                    # same every call
    assert a != stratified_partition(y, fractions, seed=43)
    assert set(a) == {"train", *fractions}
    flat = [i for part in a.values() for i in part]
    assert sorted(flat) == list(range(len(y)))                        # disjoint, union = all
    per_class = Counter(y)
    for name, frac in fractions.items():
        got = Counter(y[i] for i in a[name])
        for c, n_c in per_class.items():
            assert abs(got[c] - frac * n_c) <= 1, (name, c, got[c], n_c)
    assert all(part == sorted(part) for part in a.values())


def test_partition_keeps_singleton_classes_in_train():
    parts = stratified_partition([0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], {"val": 0.1})
    assert 0 in parts["train"] and len(parts["val"]) == 1


def test_partition_rejects_bad_fractions():
    with pytest.raises(ValueError):
        stratified_partition([0, 1], {"val": 0.6, "test": 0.5})
    with pytest.raises(ValueError):
        stratified_partition([0, 1], {"train": 0.5})


def test_stored_split_is_written_once_and_reused(tmp_path, monkeypatch):
    y = _targets()
    path = splits.split_path(tmp_path, "toy")
    assert path == tmp_path / ".residual_exp_splits" / "toy.json"
    first = load_or_create(path, dataset="toy", targets=y, fractions={"val": 0.2})
    record = json.loads(path.read_text())
    assert record["splits"] == first and record["seed"] == 42
    assert record["source"]["size"] == len(y)
    assert [p.name for p in path.parent.iterdir() if p.suffix == ".tmp"] == []   # no leftovers

    def boom(*a, **k):
        raise AssertionError("recomputed a stored split")
    monkeypatch.setattr(splits, "stratified_partition", boom)
    assert load_or_create(path, dataset="toy", targets=y, fractions={"val": 0.2}) == first


def test_stored_split_size_mismatch_is_reported(tmp_path):
    y = _targets()
    path = splits.split_path(tmp_path, "toy")
    load_or_create(path, dataset="toy", targets=y, fractions={"val": 0.1})
    with pytest.raises(SplitMismatchError) as e:
        load_or_create(path, dataset="toy", targets=y[:-3], fractions={"val": 0.1})
    msg = str(e.value)
    assert str(path) in msg and str(len(y)) in msg and str(len(y) - 3) in msg and "delete" in msg


def test_stored_split_label_or_parameter_mismatch_is_reported(tmp_path):
    y = _targets()
    path = splits.split_path(tmp_path, "toy")
    load_or_create(path, dataset="toy", targets=y, fractions={"val": 0.1})
    shuffled = list(reversed(y))
    with pytest.raises(SplitMismatchError, match="different labels"):
        load_or_create(path, dataset="toy", targets=shuffled, fractions={"val": 0.1})
    with pytest.raises(SplitMismatchError, match="fractions"):
        load_or_create(path, dataset="toy", targets=y, fractions={"val": 0.2})


def test_concurrent_creation_agrees(tmp_path):
    y = _targets(n=2000)
    path = splits.split_path(tmp_path, "toy")
    results, errors = [], []

    def job():
        try:
            results.append(load_or_create(path, dataset="toy", targets=y, fractions={"val": 0.1}))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=job) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(r == results[0] for r in results) and len(results) == 6
    assert json.loads(path.read_text())["splits"] == results[0]
