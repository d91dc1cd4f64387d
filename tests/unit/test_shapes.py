"""The embedded synthetic ``shapes`` data: determinism, label correctness, registry wiring."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from residual_exp.catalog import Split, options
from residual_exp.data import registry
from residual_exp.data import shapes
from residual_exp.data.shapes import ATTRIBUTES, COLOR_RGB, TEMPLATES, ShapesCaptions, generate

N = 5000


@pytest.fixture(scope="module")
def data():
    """5000 train images with labels and shape coverage (alpha)."""
    return generate(N, seed=0, split="train", image_size=32, return_alpha=True)


def test_api_constants():
    assert set(ATTRIBUTES) == {"shape", "color", "size", "position", "background"}
    assert set(TEMPLATES) == set(ATTRIBUTES)
    for attr, names in ATTRIBUTES.items():
        assert len(set(names)) == len(names) >= 3
        for t in TEMPLATES[attr]:
            assert t.count("{}") == 1
    assert 5 <= len(ATTRIBUTES["shape"]) <= 6 and len(ATTRIBUTES["color"]) == len(COLOR_RGB)


def test_shapes_and_dtypes(data):
    images, attrs, alpha = data
    assert images.shape == (N, 32, 32, 3) and images.dtype == np.uint8
    assert alpha.shape == (N, 32, 32) and alpha.dtype == np.uint8
    for a, names in ATTRIBUTES.items():
        assert attrs[a].shape == (N,)
        assert attrs[a].min() >= 0 and attrs[a].max() < len(names)


def test_deterministic_and_prefix_stable():
    im1, at1 = generate(300, seed=3, split="val")
    im2, at2 = generate(300, seed=3, split="val")
    assert im1.tobytes() == im2.tobytes()
    assert all(np.array_equal(at1[a], at2[a]) for a in ATTRIBUTES)
    # image i depends only on (seed, split, i): a shorter request is a prefix
    im3, at3 = generate(100, seed=3, split="val")
    assert im3.tobytes() == im1[:100].tobytes()
    assert all(np.array_equal(at3[a], at1[a][:100]) for a in ATTRIBUTES)
    # the attributes do not depend on the resolution
    im4, at4 = generate(100, seed=3, split="val", image_size=48)
    assert im4.shape == (100, 48, 48, 3)
    assert all(np.array_equal(at4[a], at1[a][:100]) for a in ATTRIBUTES)


def test_splits_and_seeds_differ():
    streams = {s: generate(256, seed=0, split=s)[0] for s in list(Split)}
    streams["seed1"] = generate(256, seed=1, split="train")[0]
    # no image of one stream equals any image of another (or of the same stream)
    digests = {img.tobytes() for imgs in streams.values() for img in imgs}
    assert len(digests) == 256 * len(streams)


def test_labels_uniform(data):
    _, attrs, _ = data
    for a, names in ATTRIBUTES.items():
        counts = np.bincount(attrs[a], minlength=len(names))
        expected = N / len(names)
        assert (counts > 0).all(), a
        assert np.abs(counts - expected).max() < 0.2 * expected, (a, counts)


def test_attributes_independent(data):
    from scipy.stats import chi2_contingency
    _, attrs, _ = data
    keys = list(ATTRIBUTES)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            table = np.zeros((len(ATTRIBUTES[a]), len(ATTRIBUTES[b])))
            np.add.at(table, (attrs[a], attrs[b]), 1)
            assert (table > 0).all(), (a, b)
            assert chi2_contingency(table).pvalue > 1e-3, (a, b)


def test_rendered_colour_matches_label(data):
    images, attrs, alpha = data
    full = alpha == 255                                             # [N, H, W]
    has = full.any(axis=(1, 2))
    assert has.mean() > 0.95                                        # almost every shape has a core
    cnt = full.sum(axis=(1, 2))[has, None]
    mean = (images[has] * full[has, ..., None]).sum(axis=(1, 2)) / cnt   # [m, 3]
    dist = np.linalg.norm(mean[:, None, :] - COLOR_RGB[None], axis=-1)  # [m, n_colors]
    assert np.array_equal(dist.argmin(1), attrs["color"][has])
    assert np.abs(mean - COLOR_RGB[attrs["color"][has]]).max() < 20


def test_background_textures(data):
    images, attrs, alpha = data
    bg = alpha == 0
    std = np.array([images[i][bg[i]].astype(float).std(axis=0).mean() for i in range(500)])
    kind = attrs["background"][:500]
    plain = ATTRIBUTES["background"].index("plain")
    assert std[kind == plain].max() < 5                             # only the pixel noise
    assert std[kind != plain].min() > 8                             # a visible texture
    # background pixels are dark/greyish, far below the bright shape colours
    assert images[bg].max() < 200


def test_position_matches_centroid_quadrant(data):
    _, attrs, alpha = data
    H = alpha.shape[1]
    w = alpha.astype(np.float64)
    ys, xs = np.mgrid[0:H, 0:H] + 0.5
    cy = (w * ys).sum((1, 2)) / w.sum((1, 2))
    cx = (w * xs).sum((1, 2)) / w.sum((1, 2))
    quadrant = 2 * (cy >= H / 2) + (cx >= H / 2)
    assert np.array_equal(quadrant, attrs["position"])
    # small and medium shapes lie entirely inside their quadrant
    q = attrs["position"]
    for i in np.flatnonzero(attrs["size"] < 2)[:1000]:
        r, c = np.nonzero(alpha[i])
        top, left = (q[i] >= 2) * H // 2, (q[i] % 2) * H // 2
        assert r.min() >= top and r.max() < top + H // 2
        assert c.min() >= left and c.max() < left + H // 2


def test_size_matches_area(data):
    _, attrs, alpha = data
    area = alpha.astype(np.float64).sum((1, 2)) / 255
    for k in range(len(ATTRIBUTES["shape"])):
        m = attrs["shape"] == k
        means = [area[m & (attrs["size"] == s)].mean() for s in range(3)]
        assert means[0] * 1.5 < means[1] and means[1] * 1.5 < means[2], (ATTRIBUTES["shape"][k], means)


def test_shapes_distinguishable(data):
    """Per size, nearest-class-mean on centred coverage crops separates the shapes."""
    _, attrs, alpha = data
    H, R = alpha.shape[1], 10
    ys, xs = np.mgrid[0:H, 0:H]
    for size in range(len(ATTRIBUTES["size"])):
        keep = np.flatnonzero(attrs["size"] == size)
        w = alpha[keep].astype(np.float32) / 255                    # [m, H, W]
        cy = np.rint((w * ys).sum((1, 2)) / w.sum((1, 2))).astype(int) + R
        cx = np.rint((w * xs).sum((1, 2)) / w.sum((1, 2))).astype(int) + R
        pad = np.pad(w, ((0, 0), (R, R), (R, R)))
        rows = cy[:, None] + np.arange(-R, R)                       # [m, 2R]
        cols = cx[:, None] + np.arange(-R, R)                       # [m, 2R]
        crops = pad[np.arange(len(keep))[:, None, None], rows[:, :, None], cols[:, None, :]]
        feats = crops.reshape(len(keep), -1)                        # [m, 4R^2]
        feats /= np.linalg.norm(feats, axis=1, keepdims=True)
        y = attrs["shape"][keep]
        half = len(keep) // 2
        means = np.stack([feats[:half][y[:half] == k].mean(0)
                          for k in range(len(ATTRIBUTES["shape"]))])   # [n_shape, 4R^2]
        means /= np.linalg.norm(means, axis=1, keepdims=True)
        pred = (feats[half:] @ means.T).argmax(1)
        assert (pred == y[half:]).mean() > 0.9, ATTRIBUTES["size"][size]


_NAME_PATTERNS = {a: [(k, re.compile(rf"\b{re.escape(n)}\b")) for k, n in enumerate(names)]
                  for a, names in ATTRIBUTES.items()}


def _mentions(caption: str) -> dict[str, list[int]]:
    return {a: [k for k, p in pats if p.search(caption)] for a, pats in _NAME_PATTERNS.items()}


def test_captions_mention_only_true_attributes():
    ds = ShapesCaptions(600, seed=0)
    assert len(ds) == 600
    mentioned = {a: 0 for a in ATTRIBUTES}
    skeletons = set()
    for i, cap in enumerate(ds.captions):
        found = _mentions(cap)
        assert any(found.values()), cap
        for a, ks in found.items():
            assert ks in ([], [int(ds.attrs[a][i])]), (cap, a, ks)
            mentioned[a] += bool(ks)
        skel = cap
        for a, names in ATTRIBUTES.items():
            for n in names:
                skel = re.sub(rf"\b{re.escape(n)}\b", a.upper(), skel)
        skeletons.add(skel)
    # every attribute is mentioned in a good share of captions, in many phrasings
    assert min(mentioned.values()) > 0.3 * len(ds)
    assert len(skeletons) > 100
    assert not any(re.search(r"\ba [aeiou]", c) for c in ds.captions)   # "an orange ..."
    # items: uint8 [3, H, W] tensors of the generated images, deterministic captions
    img, cap = ds[5]
    assert isinstance(img, torch.Tensor) and img.dtype == torch.uint8 and img.shape == (3, 32, 32)
    assert torch.equal(img.permute(1, 2, 0), torch.from_numpy(ds.images[5]))
    assert cap == ds.captions[5] == ShapesCaptions(600, seed=0).captions[5]
    assert ShapesCaptions(600, seed=1).captions != ds.captions
    pil, _ = ShapesCaptions(4, seed=0, transform=lambda im: im)[0]
    assert isinstance(pil, Image.Image) and pil.size == (32, 32)


def _cfg(name: str, **params):
    base = {"n_train": 50, "n_val": 20, "n_test": 30, "n_reference": 40, "seed": 0, "image_size": 32}
    base.update(params)
    return OmegaConf.create({"name": name, "root": "data", "download": False,
                             "batch_size": 64, "num_workers": 0, "params": base})


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255   # [3, H, W]


def test_registry_builds_all_splits():
    names = options("dataset")
    for a in ATTRIBUTES:
        assert f"shapes_{a}" in names
    cfg = _cfg("shapes_color")
    sizes = {"train": 50, "val": 20, "test": 30, "reference": 40}
    for split, n in sizes.items():
        ds = registry.build_split(cfg, split, _to_tensor)
        assert len(ds) == n and ds.split == split and ds.name == "shapes_color"
        assert ds.classnames == ATTRIBUTES["color"] and ds.templates == TEMPLATES["color"]
        assert ds.num_classes == 8
        _, attrs = generate(n, seed=0, split=split)
        assert ds.targets == attrs["color"].tolist()
        x, y = ds[3]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == ds.targets[3]
    # no transform: PIL images
    img, _ = registry.build_split(cfg, "val", None)[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    # defaults when params are missing
    bare = OmegaConf.create({"name": "shapes_size", "root": "data", "download": False,
                             "batch_size": 64, "num_workers": 0, "params": {}})
    assert len(registry.build_split(bare, "val", None)) == 1000


def test_attribute_datasets_share_images():
    cfg_c, cfg_s = _cfg("shapes_color"), _cfg("shapes_shape")
    dc = registry.build_split(cfg_c, "train", None)
    ds = registry.build_split(cfg_s, "train", None)
    assert dc.base is ds.base                                      # memoised, generated once
    assert not dc.base.flags.writeable
    assert np.array_equal(np.asarray(dc[7][0]), np.asarray(ds[7][0]))
    assert ds.targets != dc.targets and ds.classnames == ATTRIBUTES["shape"]
    assert ds.templates == TEMPLATES["shape"]
    # a DataLoader over the split works (the loader is picklable)
    loader = torch.utils.data.DataLoader(registry.build_split(cfg_s, "test", _to_tensor),
                                         batch_size=16, collate_fn=registry.stack_images)
    xb, yb = next(iter(loader))
    assert xb.shape == (16, 3, 32, 32) and yb.dtype == torch.long


def test_invalid_arguments():
    with pytest.raises(ValueError):
        generate(10, split="nope")
    with pytest.raises(ValueError):
        generate(-1)
    assert generate(0)[0].shape == (0, 32, 32, 3)
