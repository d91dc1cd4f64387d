"""Exported adapted forward ÷ plain forward, side by side (random weights, CPU).

For each architecture (open_clip ViT-B/16 and ViT-L/14 by default, random weights) the script
fits bases on a few encoded images, builds residual_full and residual_fine adapters with random
λ ~ N(1, 1) through the real construction path, folds them with the adapter's own ``fold``
(what ``task=export`` writes) and times ``AdaptedModel.encode_image`` against the backbone's plain
``encode_image`` on the same batch, interleaved (plain, adapted, plain, adapted, …) so that both
see the same machine state.  Goal: ratio ≤ 1.05 (the fold replaces the readout by a few CLS-token
matrix products; the ``[B, U, D]`` unit stack is never built).

    python scripts/bench_adapted.py                  # ViT-B-16 and ViT-L-14, batch 8
    python scripts/bench_adapted.py --quick          # ViT-B/32 at 64 px, 3 repetitions
    python scripts/bench_adapted.py --smoke          # the tiny CLIP (checks the script runs)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cache import TINY, backbone_cfg, fit, method_cfg, tiled  # noqa: E402

from residual_exp.backbones import build_backbone  # noqa: E402
from residual_exp.encode import Encoded, source_for, storage_arrays  # noqa: E402
from residual_exp.export import AdaptedModel, Folded  # noqa: E402
from residual_exp.methods import build_adapter  # noqa: E402
from residual_exp.tables import text_table  # noqa: E402



def backbone(arch: str, image_size: int | None):
    return build_backbone(backbone_cfg(arch, image_size)).eval()


def adapted(bb, method: str, enc: Encoded) -> AdaptedModel:
    ub, ob = fit(enc.source, enc, bb.output_dim)
    mc = method_cfg(method)
    ad = build_adapter(mc, enc.source, bb.output_dim, ub, ob, seed=0, units=mc.units, rank=mc).double()
    state = ad.state_dict()
    folded = type(ad).fold(state, bb.double().readout(), mc, "lowrank", "none")
    bb.float()
    head = torch.nn.functional.normalize(torch.randn(100, bb.output_dim), dim=-1)
    tensors = {k: v.float() for k, v in folded.tensors().items()}   # as in an export folder
    return AdaptedModel(bb, Folded.from_tensors(tensors, bb.output_dim), head, 100.0, True,
                        [str(i) for i in range(100)], {}).eval()


@torch.no_grad()
def interleaved(fns: dict, x: torch.Tensor, reps: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved."""
    for _ in range(warmup):
        for f in fns.values():
            f(x)
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f(x)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=["ViT-B-16", "ViT-L-14"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--images", type=int, default=8, help="images encoded to fit the bases")
    ap.add_argument("--quick", action="store_true", help="ViT-B-32 at 64 px, 3 repetitions")
    ap.add_argument("--smoke", action="store_true", help="the tiny CLIP, 2 repetitions (checks the script runs)")
    args = ap.parse_args()
    size = None
    if args.quick:
        args.archs, args.reps, args.batch, args.images, size = ["ViT-B-32"], 3, 4, 4, 64
    if args.smoke:
        args.archs, args.reps, args.batch, args.images = [TINY], 2, 4, 4
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    rows = []
    for arch in args.archs:
        bb = backbone(arch, size)
        x = torch.randn(args.batch, 3, bb.image_size, bb.image_size)
        probe = torch.randn(args.images, 3, bb.image_size, bb.image_size)
        low = {k: v.numpy() for k, v in storage_arrays(bb, probe, "lowrank").items()}
        enc = Encoded(tiled(low, 512, "float32"), np.zeros(512, np.int64), "lowrank", source_for(bb, "lowrank"))
        models = {m: adapted(bb, m, enc) for m in ("residual_full", "residual_fine")}
        fns = {"plain": bb.encode_image, **{m: mdl.encode_image for m, mdl in models.items()}}
        t = interleaved(fns, x, args.reps)
        for m in models:
            rows.append({"arch": arch, "method": m, "batch": args.batch, "plain ms": f"{t['plain'] * 1e3:.1f}",
                         "adapted ms": f"{t[m] * 1e3:.1f}", "adapted ÷ plain": f"{t[m] / t['plain']:.3f}"})
        print(f"{arch} done", flush=True)
    print(text_table(rows, list(rows[0]), right_from=2))
    print("goal: adapted ÷ plain ≤ 1.05 (CPU, random weights, median of interleaved repetitions)")


if __name__ == "__main__":
    main()
