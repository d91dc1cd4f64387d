"""Probe the decomposition over many real architectures (random weights, perturbed 1-D parameters).

For every architecture: build it exactly as ``model=timm`` / ``model=open_clip`` would (random
weights, no download), perturb every 1-D parameter and token as ``task=check_decomposition`` does,
and measure, in fp32 (``--dtype``), the relative error of Σ units against the model's own feature
and the worst per-unit error against the family's independent recomputation
(:mod:`residual_exp.decompose.references`), under both unit conventions.  Refused architectures
print their one-line reason.  Not part of the test suite (real sizes: minutes on CPU)::

    .venv/bin/python scripts/probe_zoo.py                 # the whole list (~20 min on 2 cores)
    .venv/bin/python scripts/probe_zoo.py --smoke         # three small ones
    .venv/bin/python scripts/probe_zoo.py --only siglip   # names containing "siglip"

Exit status 1 when an accepted architecture is above ``--tolerance`` (default 1e-5).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

from residual_exp.backbones import UnsupportedArchitecture, build_backbone  # noqa: E402
from residual_exp.config import ModelConfig  # noqa: E402
from residual_exp.decompose.references import perturb_1d  # noqa: E402
from residual_exp.tasks.check_decomposition import measure  # noqa: E402

# (family, arch, create kwargs) — the families first, then architectures named in no issue
ZOO = [
    ("open_clip", "ViT-B-16-SigLIP", {}), ("open_clip", "ViT-B-16-SigLIP2", {}), ("open_clip", "ViT-B-32-SigLIP2-256", {}),
    ("open_clip", "ViT-SO400M-14-SigLIP", {}), ("open_clip", "PE-Core-B-16", {}), ("open_clip", "PE-Core-T-16-384", {}),
    ("open_clip", "ViT-L-14-CLIPA", {}), ("open_clip", "nllb-clip-base", {}), ("open_clip", "xlm-roberta-base-ViT-B-32", {}),
    ("open_clip", "nllb-clip-base-siglip", {}), ("open_clip", "ViTamin-S", {}), ("open_clip", "vit_medium_patch16_gap_256", {}),
    ("open_clip", "EVA02-B-16", {}), ("open_clip", "MobileCLIP-B", {}), ("open_clip", "coca_ViT-B-32", {}),
    ("timm", "vit_base_patch16_siglip_224", {}), ("timm", "vit_base_patch16_siglip_gap_224", {}),
    ("timm", "vit_so150m_patch16_reg4_gap_256", {}), ("timm", "vit_pe_core_small_patch16_384", {}),
    ("timm", "eva02_base_patch14_224", {}), ("timm", "eva02_small_patch14_336", {}),
    ("timm", "vit_small_patch16_dinov3", {}), ("timm", "vit_small_patch16_dinov3", {"global_pool": "token"}),
    ("timm", "aimv2_large_patch14_224", {}), ("timm", "beit_base_patch16_224", {}), ("timm", "beitv2_base_patch16_224", {}),
    ("timm", "cait_xxs24_224", {}), ("timm", "naflexvit_base_patch16_gap", {}), ("timm", "naflexvit_base_patch16_map", {}),
    ("timm", "naflexvit_base_patch16_siglip", {}), ("timm", "vit_small_patch16_18x2_224", {}),
    ("timm", "vit_medium_patch16_gap_256", {}), ("timm", "vitamin_small_224", {}), ("timm", "vit_base_patch16_rope_reg1_gap_256", {}),
    ("timm", "deit3_small_patch16_224", {}), ("timm", "vit_small_patch14_reg4_dinov2", {}), ("timm", "flexivit_small", {}),
    ("timm", "vit_relpos_small_patch16_224", {}), ("timm", "vit_base_patch32_clip_224", {}),
    ("timm", "vit_small_patch16_224", {"global_pool": "max"}), ("timm", "deit_tiny_distilled_patch16_224", {}),
    ("timm", "swin_tiny_patch4_window7_224", {}),
]
SMOKE = [("timm", "vit_tiny_patch16_224", {"global_pool": "map", "class_token": False, "img_size": 64}),
         ("timm", "vit_tiny_patch16_224", {"global_pool": "avg", "fc_norm": False, "img_size": 64}),
         ("open_clip", "ViT-B-16-SigLIP", {"image_size": 64})]


def model_cfg(family: str, arch: str, kwargs: dict):
    kwargs = dict(kwargs)
    size = kwargs.pop("image_size", None)
    params = {"create_kwargs": kwargs} if kwargs else {}
    node = dict(name=family, family=family, arch=arch, pretrained=None, image_size=size, params=params)
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), node)


def probe(family: str, arch: str, kwargs: dict, dtype: torch.dtype, batch: int) -> dict:
    torch.manual_seed(0)
    row = {"arch": arch + (f" {kwargs}" if kwargs else ""), "family": family}
    t0 = time.time()
    try:
        bb = build_backbone(model_cfg(family, arch, kwargs))
    except UnsupportedArchitecture as e:
        return dict(row, status="refused", note=str(e))
    perturb_1d(bb.vision, 0)
    bb = bb.to(dtype).eval()
    x = torch.randn(batch, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(0), dtype=dtype)
    errs = {}
    for conv in ("official", "centred"):
        bb.use_convention(conv)
        r = measure(bb, x, conv)
        errs[conv] = r
    worst = max(max(r["rel_err"], r["unit_err"] or 0.0, r["ref_err"] or 0.0) for r in errs.values())
    c = bb.layout.counts()
    return dict(row, status="ok", readout=bb.pooling().kind, units=len(bb.layout),
                heads=c["head"], sum_err=max(r["rel_err"] for r in errs.values()),
                unit_err=max(r["unit_err"] or 0.0 for r in errs.values()),
                worst_unit=errs["official"]["worst"], worst=worst, seconds=time.time() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="three small architectures")
    ap.add_argument("--only", default="", help="architectures whose name contains this")
    ap.add_argument("--start", type=int, default=0, help="skip the first entries of the list")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tolerance", type=float, default=1e-5)
    args = ap.parse_args(argv)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    todo = [z for z in (SMOKE if args.smoke else ZOO)[args.start:] if args.only.lower() in z[1].lower()]
    bad = 0
    print(f"{'architecture':<58} {'readout':<7} {'units':>5} {'Σ err':>8} {'unit err':>8}  worst unit / refusal")
    print(" ".join("-" * w for w in (58, 7, 5, 8, 8)) + "  " + "-" * 20)          # rows stream in as probed
    for family, arch, kwargs in todo:
        r = probe(family, arch, kwargs, dtype, args.batch)
        if r["status"] == "refused":
            print(f"{r['arch']:<58} {'refused':<7} {'':>5} {'':>8} {'':>8}  {r['note']}", flush=True)
            continue
        flag = "" if r["worst"] <= args.tolerance else "  FAIL"
        bad += bool(flag)
        print(f"{r['arch']:<58} {r['readout']:<7} {r['units']:>5} {r['sum_err']:>8.1e} {r['unit_err']:>8.1e}  "
              f"{r['worst_unit']} ({r['seconds']:.0f} s){flag}", flush=True)
    print(f"\n{len(todo)} architectures, {bad} above tolerance {args.tolerance:g} ({args.dtype})")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
