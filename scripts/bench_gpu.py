"""One prepared GPU benchmark (< 8 min on one H200): encode, PCA and λ training, one table.

    python scripts/bench_gpu.py                    # on a CUDA machine
    python scripts/bench_gpu.py --smoke            # tiny sizes on the CPU (checks the script runs)

Random-weight open_clip ViT-B/16 and ViT-L/14, synthetic images already on the device (the
data loader is not measured: task=plan's `loader` rates cover it):

1. encode: images/s of the plain bf16-autocast forward vs the decomposed one (hooks + the exact
   low-rank readout in fp32), same batch; goal decomposed ≥ 0.9× plain;
2. PCA: images/s of the rank-aware streaming PCA update on the low-rank batches (lifted inputs,
   float64 Gram) on top of the decomposed forward;
3. λ training from a cache resident on the GPU: a CIFAR-100-sized residual_full job on ViT-L/14
   (45k train / 5k val / 10k test images, 30 epochs, no early stopping) through the real
   Lightning loop of task=train, wall seconds (goal < 60 s), and raw samples/s of the step.

Prints a table whose numbers can be put into task=plan (task.throughput.encode.<model>,
task.throughput.train_steps).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from residual_exp.backbones import build_backbone  # noqa: E402
from residual_exp.classifiers import ClassifierHead  # noqa: E402
from residual_exp.encode import Encoded, _np_dtype, source_for  # noqa: E402
from residual_exp.methods import build_adapter  # noqa: E402
from residual_exp.runtime import quiet_libraries  # noqa: E402
from residual_exp.spectral import GroupPCA, StreamingPCA  # noqa: E402
from residual_exp.spectral.lowrank import UnitBases  # noqa: E402
from residual_exp.tables import text_table  # noqa: E402
from residual_exp.train.data import batches, prepare_encoded  # noqa: E402
from residual_exp.train.fit import fit_and_test  # noqa: E402
from residual_exp.train.module import AdapterModule  # noqa: E402



def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int) -> float:
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / reps


def backbone(arch: str, device, tiny: bool):
    params = {"quick_gelu": False}
    cfg = OmegaConf.create(dict(name=arch, family="open_clip" if not tiny else "tiny_clip", arch=arch if not tiny else "tiny-clip",
                                pretrained=None, weights=None, image_size=None, precision="bf16", logit_scale=100.0,
                                cache_dir=None, params=params))
    bb = build_backbone(cfg).to(device).eval()
    for p in bb.parameters():
        p.requires_grad_(False)
    bb.precision = "bf16" if device.type == "cuda" else "fp32"
    return bb


@torch.no_grad()
def encode_section(bb, device, batch: int, reps: int) -> dict:
    x = torch.randn(batch, 3, bb.image_size, bb.image_size, device=device)
    ac = device.type == "cuda"
    with torch.autocast("cuda", torch.bfloat16, enabled=ac):
        plain = timed(lambda: bb.encode_image(x), device, reps)
    dec = timed(lambda: bb.decompose_raw(x), device, reps)
    src = source_for(bb, "lowrank")
    gp = GroupPCA(src, device=device)
    raw = bb.decompose_raw(x)
    pca = timed(lambda: gp.update(raw), device, reps)
    return {"plain img/s": batch / plain, "decomposed img/s": batch / dec, "ratio": plain / dec,
            "PCA update img/s": batch / pca, "encode+PCA img/s": batch / (dec + pca)}


def training_section(bb, device, n_train: int, n_val: int, n_test: int, epochs: int, batch: int) -> dict:
    quiet_libraries()
    with torch.no_grad():
        x = torch.randn(256, 3, bb.image_size, bb.image_size, device=device)
        raw = {k: v.float().cpu().numpy() for k, v in bb.decompose_raw(x).items()}
    rng = np.random.default_rng(0)
    src = source_for(bb, "lowrank")

    def enc(n):
        arrays = {k: (np.concatenate([a] * (n // len(a) + 1))[:n] * (1 + 0.01 * rng.standard_normal(
            (n,) + a.shape[1:])) if k != "stats" else np.concatenate([a] * (n // len(a) + 1))[:n]
                  ).astype(_np_dtype(k, "float16")) for k, a in raw.items()}
        return Encoded(arrays, rng.integers(0, 100, n), "lowrank", src)

    data = {"train": enc(n_train), "val": enc(n_val), "test": enc(n_test)}
    gp, po = GroupPCA(src, device=device), StreamingPCA(1, bb.output_dim, device=device)
    for s in range(0, n_train, 4096):
        b = data["train"].batch(slice(s, s + 4096), device, torch.float32)
        gp.update(b)
        po.update(b["feature"][:, None].double())
    # the real pipeline saves the bases to the cache and loads them on the CPU; do the same
    ub, ob = gp.finalize(), po.finalize().to("cpu")
    ub = UnitBases({g: (idx, b.to("cpu")) for g, (idx, b) in ub.groups.items()}, ub.num_units)
    cfg = OmegaConf.create(dict(name="residual_full", units="heads+mlps", others="add", evr=None, k=None,
                                dropped_value=0.0, init="normal", lr=0.8, batch_size=batch, weight_decay=0.0,
                                grad_clip=None, cache=True))
    ad = build_adapter(cfg, src, bb.output_dim, ub, ob, seed=0, units=cfg.units, rank=cfg).float().to(device)
    head = ClassifierHead(torch.randn(100, bb.output_dim), 100.0)
    t = time.perf_counter()
    prepared = {k: prepare_encoded(ad, e, torch.float32, device=device) for k, e in data.items()}
    sync(device)
    prep_s = time.perf_counter() - t
    eval_batch = 8192 if device.type == "cuda" else batch
    loaders = {k: batches(d, batch if k == "train" else eval_batch, k == "train", 0, 0) for k, d in prepared.items()}
    tcfg = OmegaConf.create(dict(max_epochs=epochs, patience=epochs + 1, lr_find=False, accelerator="auto", devices=1,
                                 precision="32-true", num_workers=0, progress_bar=False, cpu_threads=None))
    module = AdapterModule(ad, head, 0.8)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        res = fit_and_test(module, loaders, tcfg, Path(tmp), None, str(device))
        fit_s = time.perf_counter() - t
    steps = epochs * -(-n_train // batch)
    print({"fit+test s": round(fit_s, 1), "epochs": res.epochs_run, "Lightning steps/s": round(steps / fit_s, 1)}, flush=True)
    ad.to(device)                          # Lightning's teardown moves the module back to the CPU
    # raw step rate (no Lightning)
    import schedulefree
    opt = schedulefree.AdamWScheduleFree(ad.parameters(), lr=0.8)
    opt.train()
    tr = prepared["train"].tensors
    idx = torch.randint(0, n_train, (batch,), device=device)

    def step():
        b = {k: v[idx] for k, v in tr.items()}
        lab = b.pop("label")
        loss = torch.nn.functional.cross_entropy(head.to(device)(ad(**b)), lab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    per = timed(step, device, 200)
    return {"λ": ad.trainable_params(), "prepare s": prep_s, "fit+test s": fit_s, "epochs": res.epochs_run,
            "Lightning steps/s": steps / fit_s, "raw step samples/s": batch / per}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (checks that the script runs)")
    ap.add_argument("--train-only", action="store_true", help="skip the encode rows (section 3 only)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    tiny = args.smoke
    t0 = time.perf_counter()
    rows = []
    archs = [("tiny-clip", 8)] if tiny else [("ViT-B-16", 256), ("ViT-L-14", 128)]
    if args.train_only:
        archs = archs[-1:]
    for arch, batch in archs:
        bb = backbone(arch, device, tiny)
        if not args.train_only:
            r = encode_section(bb, device, batch, 2 if tiny else 10)
            rows.append({"what": f"encode {arch} (batch {batch})", **{k: f"{v:,.2f}" if k == "ratio" else f"{v:,.0f}"
                                                                     for k, v in r.items()}})
            print(rows[-1], flush=True)
        if arch in ("ViT-L-14", "tiny-clip"):
            sizes = (512, 128, 128, 2) if tiny else (45_000, 5_000, 10_000, 30)
            tr = training_section(bb, device, *sizes, batch=64)
            rows.append({"what": f"residual_full {arch}, {sizes[0]:,} train, {sizes[3]} epochs",
                         **{k: (f"{v:,.1f}" if isinstance(v, float) else f"{v:,}") for k, v in tr.items()}})
            print(rows[-1], flush=True)
        del bb
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\ndevice: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
          f"total {time.perf_counter() - t0:.0f} s")
    for r in rows:
        print(text_table([r], list(r), right_from=1))
        print()


if __name__ == "__main__":
    main()
