"""Cache layouts side by side: bytes per image and λ-training throughput, before vs now.

    python scripts/bench_cache.py                       # ViT-B/16 and ViT-L/14 sizes, random weights, CPU
    python scripts/bench_cache.py --archs ViT-B-16 --images 16 --steps 100
    python scripts/bench_cache.py --smoke              # the tiny CLIP, tiny sizes (checks the script runs)

*before*: every unit stored in the output space (``[N, U, D]``, float32, the layout this project
used until now) and bases with D components per unit (residual_full trained D λ per head);
*now*: the low-rank layout (per-head z + projected embedding/MLPs + LayerNorm statistics,
float16) and rank-aware bases (head_dim components per head).  Both are measured in one run on
the same images: bytes per image from the arrays the cache writes, and residual_full /
residual_fine λ-training samples/s (forward + backward + Schedule-Free AdamW step over prepared
tensors in memory, batch 64, one thread set by torch defaults), plus the one-time prepare cost.
Values of the encodings do not change the throughput, so the encoded rows are tiled (with a
little noise, to give the bases full rank) to the number of training samples.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from residual_exp.backbones import build_backbone  # noqa: E402
from residual_exp.backbones.tiny_clip import ARCH as TINY  # noqa: E402
from residual_exp.decompose.readout import DenseSource  # noqa: E402
from residual_exp.encode import Encoded, _np_dtype, source_for, storage_arrays  # noqa: E402
from residual_exp.methods import build_adapter  # noqa: E402
from residual_exp.spectral import GroupPCA, StreamingPCA  # noqa: E402
from residual_exp.tables import text_table  # noqa: E402
from residual_exp.train.data import prepare_encoded  # noqa: E402


def backbone_cfg(arch: str, image_size: int | None = None):
    """A random-weight model config for ``arch``: an open_clip architecture, or ``TINY`` (the
    embedded tiny CLIP's architecture, what --smoke runs)."""
    return OmegaConf.create(dict(name=arch, family="tiny_clip" if arch == TINY else "open_clip", arch=arch,
                                 pretrained=None, weights=None, image_size=image_size, precision="fp32",
                                 logit_scale=100.0, cache_dir=None, params={"quick_gelu": False}))


def method_cfg(name: str):
    units, others, evr = {"residual_full": ("heads+mlps", "add", None), "residual_fine": ("heads", "drop", 0.9)}[name]
    return OmegaConf.create(dict(name=name, units=units, others=others, evr=evr, k=None, dropped_value=0.0,
                                 init="normal", lr=0.8, batch_size=64, weight_decay=0.0, grad_clip=None, cache=True))


def tiled(arrays: dict, n: int, dtype: str, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for k, a in arrays.items():
        reps = np.concatenate([a] * (n // len(a) + 1))[:n].astype(np.float64)
        if k != "stats":
            reps = reps + 0.01 * rng.standard_normal(reps.shape) * (np.abs(a).mean() + 1e-6)
        out[k] = reps.astype(_np_dtype(k, dtype))
    return out


def fit(source, enc: Encoded, dim: int):
    gp, po = GroupPCA(source), StreamingPCA(1, dim)
    for s in range(0, len(enc), 512):
        b = enc.batch(slice(s, s + 512), dtype=torch.float32)
        gp.update(b)
        po.update(b["feature"][:, None].double())
    return gp.finalize(), po.finalize()


def train_rate(adapter, data, steps: int, batch: int = 64) -> float:
    import schedulefree
    opt = schedulefree.AdamWScheduleFree(adapter.parameters(), lr=0.8)
    opt.train()
    head = torch.randn(100, adapter.recon.shape[1])
    n = len(next(iter(data.tensors.values())))
    g = torch.Generator().manual_seed(0)
    t0 = None
    for step in range(steps + 10):
        if step == 10:
            t0 = time.perf_counter()
        idx = torch.randint(0, n, (batch,), generator=g)
        b = {k: v[idx] for k, v in data.tensors.items()}
        label = b.pop("label")
        loss = torch.nn.functional.cross_entropy(adapter(**b) @ head.T, label % 100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=["ViT-B-16", "ViT-L-14"])
    ap.add_argument("--images", type=int, default=16, help="images actually encoded per architecture")
    ap.add_argument("--samples", type=int, default=4096, help="training samples (tiled encodings)")
    ap.add_argument("--steps", type=int, default=60, help="timed training steps per method and layout")
    ap.add_argument("--smoke", action="store_true", help="the tiny CLIP, 4 images, 256 samples, 3 steps")
    args = ap.parse_args()
    if args.smoke:
        args.archs, args.images, args.samples, args.steps = [TINY], 4, 256, 3
    torch.manual_seed(0)
    rows = []
    for arch in args.archs:
        bb = build_backbone(backbone_cfg(arch)).eval()
        x = torch.randn(args.images, 3, bb.image_size, bb.image_size)
        t = time.perf_counter()
        with torch.no_grad():
            low = {k: v.numpy() for k, v in storage_arrays(bb, x, "lowrank").items()}
            dense = {k: v.numpy() for k, v in storage_arrays(bb.use_convention("centred"), x, "dense").items()}
        bb.use_convention("official")
        print(f"{arch}: encoded {args.images} images in {time.perf_counter() - t:.1f} s", flush=True)
        readout = bb.readout()
        now_src = source_for(bb, "lowrank")
        # before: dense [N, U, D] float32 units (centred, 2 constant units) and D components per unit
        before_src = DenseSource(bb.readout("centred").layout, bb.output_dim, head_dim=bb.output_dim,
                                 width=bb.output_dim)
        encs = {"before": Encoded(tiled(dense, args.samples, "float32"), np.zeros(args.samples, np.int64), "dense",
                                  before_src),
                "now": Encoded(tiled(low, args.samples, "float16"), np.zeros(args.samples, np.int64), "lowrank",
                               now_src)}
        bpi = {"before": sum(a.nbytes for a in encs["before"].arrays.values()) / args.samples + 8,
               "now": sum(a.nbytes for a in encs["now"].arrays.values()) / args.samples + 8}
        bases = {k: fit(e.source, e, bb.output_dim) for k, e in encs.items()}
        for method in ("residual_full", "residual_fine"):
            res = {}
            for k, e in encs.items():
                ub, ob = bases[k]
                mc = method_cfg(method)
                ad = build_adapter(mc, e.source, bb.output_dim, ub, ob, seed=0, units=mc.units, rank=mc).float()
                t = time.perf_counter()
                data = prepare_encoded(ad, e, torch.float32)
                prep = (time.perf_counter() - t) / args.samples * 1e6
                res[k] = dict(params=ad.trainable_params(), prep_us=prep, rate=train_rate(ad, data, args.steps),
                              prepared=sum(v[0].numel() * v.element_size() for v in data.tensors.values()))
            rows.append({"arch": arch, "method": method, "bytes/img before": f"{bpi['before']:,.0f}",
                         "bytes/img now": f"{bpi['now']:,.0f}", "bytes ×": f"{bpi['before'] / bpi['now']:.1f}",
                         "λ before": f"{res['before']['params']:,}", "λ now": f"{res['now']['params']:,}",
                         "prepare µs/img before": f"{res['before']['prep_us']:.0f}",
                         "prepare µs/img now": f"{res['now']['prep_us']:.0f}",
                         "train samples/s before": f"{res['before']['rate']:,.0f}",
                         "train samples/s now": f"{res['now']['rate']:,.0f}",
                         "train ×": f"{res['now']['rate'] / res['before']['rate']:.2f}"})
            print(rows[-1], flush=True)
        del bb, readout
    cols = list(rows[0])
    print()
    print(text_table(rows, cols, right_from=2))


if __name__ == "__main__":
    main()
