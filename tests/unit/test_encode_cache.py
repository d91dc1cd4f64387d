"""Encode once: the cached path equals the backbone-in-the-loop path; caches are keyed and atomic."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from residual_exp.backbones import build_backbone
from residual_exp.cache import Cache
from residual_exp.classifiers import ClassifierHead
from residual_exp.data.registry import build_split
from residual_exp.encode import dataset_identity, encode_split, fit_bases, model_identity
from residual_exp.train.data import Feed, ImageItems, StreamedEncoded, batches, prepare_encoded
from residual_exp.train.module import AdapterModule
from tests.conftest import build_adapter_of


MODEL = OmegaConf.create(dict(name="tiny_clip", family="tiny_clip", arch="tiny-clip", pretrained=None, weights=None, image_size=None, precision="auto",
                              logit_scale=100.0, cache_dir=None, params={}))
DATA = OmegaConf.create(dict(name="shapes_color", root="data", download=False, batch_size=16, num_workers=0,
                             params=dict(n_train=48, n_val=8, n_test=8, n_reference=64)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    bb = build_backbone(MODEL).double().eval()
    cache = Cache(tmp_path_factory.mktemp("cache"))
    split = build_split(DATA, "train", bb.transform)
    ident = lambda s, ds: {"model": model_identity(MODEL, 0), "dataset": dataset_identity(DATA, ds, bb.transform)}
    enc = encode_split(bb, split, cache, ident("train", split), "cpu", 16, dtype="float64", progress=False)
    ref = build_split(DATA, "reference", bb.transform)
    ub, ob = fit_bases(bb, ref, cache, ident("reference", ref), "cpu", 16, progress=False)
    return bb, cache, split, enc, ub, ob, ident


@pytest.mark.parametrize("method,units,others", [("residual_full", "heads+mlps", "add"),
                                                 ("residual_fine", "heads", "drop"),
                                                 ("residual_coarse", "heads", "mean"),
                                                 ("spectral_adapter", "output", "drop"),
                                                 ("linear_adapter", "output", "drop")])
def test_cached_and_backbone_in_the_loop_give_the_same_logits(setup, method, units, others):
    bb, cache, split, enc, ub, ob, _ = setup
    mcfg = OmegaConf.create(dict(name=method, units=units, others=others, evr=0.9 if method == "residual_fine" else None,
                                 k=None, dropped_value=0.0, init="default" if method == "linear_adapter" else "normal",
                                 lr=0.8, batch_size=64, weight_decay=0.0, grad_clip=None, cache=True))
    adapter = build_adapter_of(mcfg, enc.source, bb.output_dim, ub, ob, seed=0).double()
    head = ClassifierHead(torch.randn(8, bb.output_dim, dtype=torch.float64), 50.0)
    cached = AdapterModule(adapter, head, 0.1)
    live = AdapterModule(adapter, head, 0.1, feed=Feed.from_images(adapter, bb))
    streamed = AdapterModule(adapter, head, 0.1, feed=Feed("streamed", adapter))
    with torch.no_grad():
        a = torch.cat([cached(b) for b in batches(prepare_encoded(adapter, enc, torch.float64), 16, False)])
        b = torch.cat([live(x) for x in batches(ImageItems(split), 16, False)])
        c = torch.cat([streamed(x) for x in batches(StreamedEncoded(enc, torch.float64), 16, False)])
    assert a.shape == (48, 8)
    assert (a - b).abs().max() <= 1e-8
    assert (a - c).abs().max() <= 1e-8


def test_encodings_are_reused_and_keyed(setup):
    bb, cache, split, enc, *_ , ident = setup
    files = sorted((cache.root / "encodings").iterdir())
    again = encode_split(bb, split, cache, ident("train", split), "cpu", 16, dtype="float64", progress=False)
    assert sorted((cache.root / "encodings").iterdir()) == files          # no new entry
    np.testing.assert_array_equal(again.arrays["z"], enc.arrays["z"])
    assert enc.units.shape == (48, len(bb.layout), bb.output_dim)
    np.testing.assert_allclose(enc.units[:].sum(1), enc.features, atol=1e-10)
    # another dtype is another key
    encode_split(bb, split, cache, ident("train", split), "cpu", 16, dtype="float32", progress=False)
    assert len([p for p in (cache.root / "encodings").iterdir() if p.is_dir()]) == 2


def test_large_encodings_are_streamed_from_disk(setup):
    bb, cache, split, enc, *_, ident = setup
    small = encode_split(bb, split, cache, ident("train", split), "cpu", 16, dtype="float64",
                         memory_budget_gb=1e-9, progress=False)
    assert small.streamed and isinstance(small.arrays["z"], np.memmap)
    np.testing.assert_array_equal(small.units[:], enc.units[:])


def test_interrupted_build_leaves_no_entry(tmp_path):
    cache = Cache(tmp_path)

    def build(tmp):
        tmp.mkdir()
        (tmp / "half.npy").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.get_or_build("encodings", {"a": 1}, build, load=lambda p: p)
    leftovers = [p for p in (tmp_path / "encodings").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []
    assert cache.get_or_build("encodings", {"a": 1}, lambda t: t.mkdir(), load=lambda p: p.exists())


def test_lowrank_and_dense_cache_entries_give_the_same_units_also_streamed(setup):
    bb, cache, split, enc, *_, ident = setup
    dense = encode_split(bb, split, cache, ident("train", split), "cpu", 16, dtype="float64", progress=False,
                         layout="dense")
    streamed = encode_split(bb, split, cache, ident("train", split), "cpu", 16, dtype="float64",
                            memory_budget_gb=1e-9, progress=False)
    assert dense.layout == "dense" and set(dense.arrays) == {"units", "feature"}
    assert enc.nbytes < dense.nbytes
    np.testing.assert_allclose(streamed.units[:], dense.arrays["units"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(enc.units[:, 3], dense.arrays["units"][:, 3], rtol=0, atol=1e-10)
