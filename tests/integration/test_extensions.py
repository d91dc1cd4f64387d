"""Extending the framework from outside the package: a dataset, a method and a backbone family are
each one module (anywhere on the path) plus one YAML file (in a folder on Hydra's search path),
through the public registration path — no file of the package is edited — and run end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT

TOY_DATASET = '''
"""A dataset from outside the package: three colour classes of noisy solid 32×32 images."""
import numpy as np
from PIL import Image

from residual_exp.data.integrity import Synthetic
from residual_exp.data.registry import ClassificationSplit

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
SPLIT_SEED = {"train": 0, "val": 1, "test": 2, "reference": 3}


def build(cfg, split, transform=None):
    n = int(cfg.params.get(f"n_{split}", 60))
    rng = np.random.default_rng(SPLIT_SEED[split])
    labels = [i % len(COLORS) for i in range(n)]
    rgb = np.array(list(COLORS.values()))
    items = [(Image.fromarray(np.clip(rgb[t] + rng.integers(-25, 25, (32, 32, 3)), 0, 255).astype(np.uint8)), t)
             for t in labels]
    return ClassificationSplit(items, None, labels, list(COLORS), ["a photo of a {} shape."], cfg.name, split,
                               transform, provenance=Synthetic("toy_colours", 1, {"split": split, "n": n}))
'''

TOY_DATASET_YAML = '''
name: toy_colours
batch_size: 32
params: {n_train: 60, n_val: 30, n_test: 30, n_reference: 200}
spec:
  description: three noisy solid colours (a dataset from outside the package)
  builder: toy_dataset.build
  protocol: synthetic
  classnames: the colour names
  templates: one template
'''

TOY_METHOD = '''
"""A method from outside the package: one trained scale per output coordinate, λ ⊙ f."""
import torch
import torch.nn as nn

from residual_exp.export import Folded
from residual_exp.methods.base import Adapter


class ScaleAdapter(Adapter):
    needs = "feature"

    def __init__(self, dim, init):
        super().__init__()
        start = torch.ones(dim) if init == "ones" else 1 + torch.randn(dim, generator=torch.Generator().manual_seed(0))
        self.lam = nn.Parameter(start)

    @classmethod
    def build(cls, cfg, ctx):
        return cls(ctx.output_dim, cfg.init)

    def forward(self, feature):
        return feature * self.lam.to(feature.dtype)

    def lambda_state(self, layout):
        return {"lambda": self.lam}, ["output"]

    def lambda_values(self):
        return self.lam.detach().float().cpu()

    @classmethod
    def fold(cls, state, readout, cfg, layout, compat):
        return Folded(readout.layout_dim, feature=torch.diag(state["lam"].double()))
'''

TOY_METHOD_YAML = '''
defaults:
  - /units@_global_.units: output
  - /rank@_global_.rank: all
  - _self_
name: toy_scale
init: ones
lr: 0.01
spec:
  description: one trained scale per output coordinate (a method from outside the package)
  adapter: toy_method.ScaleAdapter
  acts_on: output
  inits: [ones, normal]
  others: [drop]
  trained: one scale per output coordinate
  params: D
'''


@pytest.fixture
def ext(tmp_path):
    """A plugin folder: the modules on PYTHONPATH, the YAML files on Hydra's search path."""
    code, conf = tmp_path / "ext", tmp_path / "ext" / "conf"
    for group, name, text in (("dataset", "toy_colours", TOY_DATASET_YAML), ("method", "toy_scale", TOY_METHOD_YAML)):
        (conf / group).mkdir(parents=True, exist_ok=True)
        (conf / group / f"{name}.yaml").write_text(textwrap.dedent(text).lstrip())
    (code / "toy_dataset.py").write_text(TOY_DATASET)
    (code / "toy_method.py").write_text(TOY_METHOD)
    return tmp_path, code, [f"hydra.searchpath=[file://{conf}]"]


def _cli(args, root: Path, code: Path, check: bool = True):
    env = dict(os.environ, RESIDUAL_EXP_ROOT=str(root), WANDB_MODE="offline", PYTHONPATH=f"{code}:{ROOT}")
    proc = subprocess.run([sys.executable, "-m", "residual_exp", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _records(root: Path, run_name: str) -> list[dict]:
    (path,) = (root / "outputs" / "runs" / run_name).rglob("results.json")
    return json.loads(path.read_text())


def test_a_dataset_from_outside_the_package_trains_end_to_end(ext):
    root, code, search = ext
    _cli([*search, "dataset=toy_colours", "method=residual_full", "trainer=fast", "logger=none"], root, code)
    base, full = _records(root, "tiny_clip-toy_colours-residual_full")
    assert base["dataset"] == full["dataset"] == "toy_colours"
    assert full["trainable_params"] == 16 * 32 + 4 * 64
    assert base["test_accuracy"] > 0.6           # the tiny CLIP knows its colours: a meaningful zero-shot head
    help_text = _cli([*search, "--help"], root, code).stdout
    assert "toy_colours" in help_text and "three noisy solid colours" in " ".join(help_text.split())


def test_a_method_from_outside_the_package_trains_exports_and_predicts(ext, tmp_path):
    root, code, search = ext
    _cli([*search, "dataset=toy_colours", "method=toy_scale", "trainer=fast", "logger=none"], root, code)
    base, toy = _records(root, "tiny_clip-toy_colours-toy_scale")
    assert toy["method"] == "toy_scale" and toy["trainable_params"] == 64        # D of the tiny CLIP
    (run_dir,) = [p.parent for p in (root / "outputs" / "runs" / "tiny_clip-toy_colours-toy_scale").rglob("results.json")]
    from residual_exp.results import load_lambda
    assert load_lambda(run_dir).lam.shape == (64,)
    out = tmp_path / "export"
    _cli([*search, "task=export", f"run_dir={run_dir}", f"out={out}"], root, code)
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image
    Image.new("RGB", (32, 32), (220, 30, 30)).save(images / "red.png")
    Image.new("RGB", (32, 32), (30, 40, 220)).save(images / "blue.png")
    _cli(["task=predict", f"model_dir={out}", f"inputs={images}", f"task.out_dir={tmp_path / 'pred'}"], root, code)
    rows = (tmp_path / "pred" / "predictions.csv").read_text().splitlines()
    assert any("red.png" in r and ",red," in r for r in rows) and any("blue.png" in r and ",blue," in r for r in rows)


def test_a_plugin_option_is_validated_like_the_package_ones(ext):
    root, code, search = ext
    proc = _cli([*search, "method=toy_scale", "method.init=eigenvalues", "method.lr=0"], root, code, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "method.init=eigenvalues: method=toy_scale takes ones | normal" in proc.stderr
    assert "method.lr=0.0: must be a finite number > 0" in proc.stderr and "Traceback" not in proc.stderr


def test_a_plugin_yaml_with_a_key_no_schema_has_is_refused_naming_the_file(ext):
    """A method YAML written before units became a group (``units:`` inside the method) gets one
    line naming the file, the key and where it went — not Hydra's bare first line."""
    root, code, search = ext
    path = code / "conf" / "method" / "old_style.yaml"
    path.write_text("name: old_style\nunits: output\nspec:\n  adapter: toy_method.ScaleAdapter\n  acts_on: output\n")
    proc = _cli([*search, "method=old_style"], root, code, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "method/old_style.yaml: unknown key method.units (did you mean units=NAME" in proc.stderr


TOY_FAMILY = '''
"""A backbone family from outside the package: a plain-torch ViT (per-head attention written out)."""
import torch
import torch.nn as nn
from torchvision import transforms

from residual_exp.backbones.base import Backbone, register_backbone
from residual_exp.decompose.readout import lens_from


class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        B, N, W = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, W // self.heads).unbind(2)          # [B, N, H, Dh]
        a = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) * (W // self.heads) ** -0.5, -1)
        return self.proj(torch.einsum("bhnm,bmhd->bnhd", a, v).reshape(B, N, W))            # heads → [B, N, W]


class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(width), Attention(width, heads), nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ToyViT(nn.Module):
    def __init__(self, layers, width, heads, patch, image, dim):
        super().__init__()
        self.patch = nn.Conv2d(3, width, patch, patch)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, width))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 1 + (image // patch) ** 2, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm, self.proj = nn.LayerNorm(width), nn.Parameter(width ** -0.5 * torch.randn(width, dim))

    def forward(self, images):
        t = self.patch(images).flatten(2).transpose(1, 2)                                   # [B, N, W]
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1) + self.pos
        for block in self.blocks:
            t = block(t)
        return self.norm(t[:, 0]) @ self.proj


class ToyBackbone(Backbone):
    family = "toy_vit"

    def __init__(self, name, s):
        tf = transforms.Compose([transforms.Resize((s.image_size, s.image_size)), transforms.ToTensor()])
        super().__init__(name, s.output_dim, s.layers, s.heads, tf, s.image_size, has_text=False)
        self.model = ToyViT(s.layers, s.width, s.heads, s.patch, s.image_size, s.output_dim)

    @property
    def vision(self):
        return self.model

    def encode_image(self, images):
        return self.model(images)

    def _install(self, hs, store):                      # the CLS row of every unit's contribution
        store["heads"], store["mlps"] = [], []
        H = self.num_heads
        hs.forward_pre_hook(self.model.blocks[0], lambda m, a: store.__setitem__("embed", a[0][:, 0].clone()))
        for block in self.model.blocks:
            hs.forward_pre_hook(block.attn.proj, lambda m, a: store["heads"].append(
                a[0][:, 0].reshape(len(a[0]), H, -1).clone()))                                 # [B, H, Dh]
            hs.forward_hook(block.mlp, lambda m, a, out: store["mlps"].append(out[:, 0].clone()))
        hs.forward_pre_hook(self.model.norm, lambda m, a: store.__setitem__("final_in", a[0].clone()))

    def final(self):
        return self.model.norm, self.model.proj, None

    def lens(self):
        blocks = self.model.blocks
        return lens_from([b.attn.proj.weight for b in blocks], [b.attn.proj.bias for b in blocks],
                         [None] * len(blocks), self.num_heads, self.model.norm, self.model.proj)


@register_backbone("toy_vit", "a plain-torch ViT from outside the package")
def build(cfg):
    return ToyBackbone(cfg.name, cfg.spec)
'''

TOY_FAMILY_YAML = '''
name: toy_vit
family: toy_vit
spec:
  description: a plain-torch ViT (a backbone family from outside the package)
  module: toy_family
  layers: 2
  heads: 4
  head_dim: 8
  width: 32
  output_dim: 16
  image_size: 32
  patch: 8
'''


def test_a_backbone_family_from_outside_the_package_decomposes_and_trains(ext):
    root, code, search = ext
    (code / "toy_family.py").write_text(TOY_FAMILY)
    (code / "conf" / "model").mkdir()
    (code / "conf" / "model" / "toy_vit.yaml").write_text(textwrap.dedent(TOY_FAMILY_YAML).lstrip())
    out = _cli([*search, "task=check_decomposition", "model=toy_vit", "task.dtype=float64",
                "task.tolerance=1e-10"], root, code).stdout
    import re
    assert "units (official convention): 11 = 1 embed + 8 head + 2 mlp" in out
    assert float(re.search(r"max relative error \(∞-norm\)\s+= (\S+)", out).group(1)) < 1e-12   # Σ units == feature
    _cli([*search, "model=toy_vit", "dataset=toy_colours", "method=residual_full", "trainer=fast", "logger=none"],
         root, code)
    base, full = _records(root, "toy_vit-toy_colours-residual_full")
    assert base["classifier"].startswith("prototype") and full["model"] == "toy_vit"
    assert full["trainable_params"] == 2 * 4 * 8 + 2 * 16       # rank-aware: head_dim per head, D per MLP
    assert full["selected_units"] == ["L0H0", "L0H1", "L0H2", "L0H3", "L0.mlp", "L1H0", "L1H1", "L1H2", "L1H3",
                                      "L1.mlp"]
