"""Encode-once vs backbone-in-the-loop: one complete ResiDual training, side by side.

Each mode runs in its own fresh subprocess (so peak RSS / CUDA peak memory are per mode):

* ``cached``  — fit bases on the reference split, encode train/val/test once, train λ for
  ``--epochs`` epochs over the cached tensors, test;
* ``in_loop`` — fit bases, then run the backbone on every batch of every epoch (the official
  code's approach; ``method.cache=false`` here), test.

Early stopping is off (patience > epochs) so both run exactly ``--epochs`` epochs.  The
in-the-loop mode on a CPU is slow, so ``--loop-epochs N`` (default: all) runs only N epochs
and extrapolates the training part linearly to ``--epochs``; the table says when it did.

    python scripts/bench_train.py                          # tiny CLIP + random ViT-B/16
    python scripts/bench_train.py --models vit_b16 --loop-epochs 2
    python scripts/bench_train.py --smoke                  # tiny sizes on the CPU (checks the script runs)

A child that fails (an exception, or killed) fails the script at once with its error.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from omegaconf import OmegaConf


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # this checkout's package (children too)

MODELS = {
    "tiny_clip": dict(name="tiny_clip", family="tiny_clip", arch="tiny-clip", pretrained="embedded"),
    "vit_b16": dict(name="open_clip", family="open_clip", arch="ViT-B-16", pretrained=None),
}


def _cfgs(model: str, n_train: int, n_eval: int, n_ref: int, epochs: int, batch: int):
    model_cfg = OmegaConf.create(dict(weights=None, image_size=None, logit_scale=100.0, cache_dir=None, params={},
                                      **MODELS[model]))
    data_cfg = OmegaConf.create(dict(name="shapes_shape", root="data", download=False, batch_size=batch,
                                     num_workers=0, params=dict(n_train=n_train, n_val=n_eval, n_test=n_eval,
                                                                n_reference=n_ref)))
    trainer_cfg = OmegaConf.create(dict(max_epochs=epochs, patience=epochs + 1, lr_find=False, accelerator="auto", devices=1, precision="32-true",
                                        num_workers=0, progress_bar=False, cpu_threads=None))
    method_cfg = OmegaConf.create(dict(name="residual_full", units="heads+mlps", others="add", evr=None, k=None,
                                       dropped_value=0.0, init="normal", lr=0.8, batch_size=64, weight_decay=0.0,
                                       grad_clip=None, cache=True))
    return model_cfg, data_cfg, trainer_cfg, method_cfg


def _one(mode: str, model: str, args) -> dict:
    from residual_exp.backbones import build_backbone
    from residual_exp.cache import Cache
    from residual_exp.classifiers import ClassifierHead, zero_shot_weights
    from residual_exp.data.registry import build_split
    from residual_exp.encode import dataset_identity, encode_split, fit_bases, model_identity, source_for
    from residual_exp.methods import build_adapter
    from residual_exp.runtime import quiet_libraries
    from residual_exp.train.data import Feed, ImageItems, batches, prepare_encoded
    from residual_exp.train.fit import fit_and_test, training_threads
    from residual_exp.train.module import AdapterModule

    quiet_libraries()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    epochs = args.epochs if mode == "cached" or not args.loop_epochs else min(args.loop_epochs, args.epochs)
    mcfg, dcfg, tcfg, methcfg = _cfgs(model, args.n_train, args.n_eval, args.n_ref, epochs, args.batch)
    torch.manual_seed(0)
    bb = build_backbone(mcfg).to(device).eval()
    for p in bb.parameters():
        p.requires_grad_(False)
    ident = lambda s, ds: {"model": model_identity(mcfg, 0), "dataset": dataset_identity(dcfg, ds, bb.transform)}
    splits = {s: build_split(dcfg, s, bb.transform) for s in ("train", "val", "test", "reference")}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Cache(Path(tmp) / "cache")
        t = time.perf_counter()
        ub, ob = fit_bases(bb, splits["reference"], cache, ident("reference", splits["reference"]), device,
                           args.batch, progress=False)
        head = ClassifierHead(zero_shot_weights(bb, splits["train"].classnames, splits["train"].templates,
                                                device, progress=False).float(), bb.logit_scale)
        times["bases"] = time.perf_counter() - t
        adapter = build_adapter(methcfg, source_for(bb, "lowrank"), bb.output_dim, ub, ob, seed=0, units=methcfg.units,
                                rank=methcfg).float()
        t = time.perf_counter()
        if mode == "cached":
            enc = {s: encode_split(bb, splits[s], cache, ident(s, splits[s]), device, args.batch, progress=False)
                   for s in ("train", "val", "test")}
            data = {s: prepare_encoded(adapter, enc[s], torch.float32, device=device) for s in enc}
            module = AdapterModule(adapter, head, 0.8)
        else:
            data = {s: ImageItems(splits[s]) for s in ("train", "val", "test")}
            module = AdapterModule(adapter, head, 0.8, feed=Feed.from_images(adapter, bb))
        times["encode"] = time.perf_counter() - t
        loaders = {s: batches(d, 64, s == "train") for s, d in data.items()}
        t = time.perf_counter()
        with training_threads(adapter, tcfg, methcfg.batch_size, device, mode != "cached"):
            res = fit_and_test(module, loaders, tcfg, Path(tmp) / "run", None, device)
        times["train+test"] = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return dict(mode=mode, model=model, epochs_run=epochs, times=times, test_acc=res.test_accuracy,
                peak_mib=peak, device=device, memory="CUDA max allocated" if device == "cuda" else "peak RSS")


class ChildFailed(RuntimeError):
    """A measuring child process raised or died before it sent its figures."""


def _child(target, mode: str, model: str, args, q) -> None:
    """Runs in the child: ``("ok", figures)`` or ``("error", traceback)`` on the queue, never nothing."""
    try:
        q.put(("ok", target(mode, model, args)))
    except BaseException:                                    # noqa: BLE001 - reported to the parent
        q.put(("error", traceback.format_exc()))
        q.close()
        q.join_thread()
        sys.exit(1)


def run_mode(mode: str, model: str, args, target=_one, poll_s: float = 0.5) -> dict:
    """``target(mode, model, args)`` in a fresh spawned process; its figures, or
    :class:`ChildFailed` as soon as it raised or died (exit code and traceback in the message)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(target, mode, model, args, q))
    p.start()
    try:
        while True:
            try:
                kind, payload = q.get(timeout=poll_s)
                break
            except queue.Empty:
                if p.is_alive():
                    continue
                try:                                         # it may have put its answer just before exiting
                    kind, payload = q.get(timeout=poll_s)
                    break
                except queue.Empty:
                    raise ChildFailed(f"{mode}/{model}: the child process died (exit code {p.exitcode}) "
                                      f"without sending its figures") from None
    finally:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
            p.join()
    if kind == "error":
        raise ChildFailed(f"{mode}/{model}: the child process failed:\n{payload.rstrip()}")
    return payload


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny_clip", "vit_b16"], choices=sorted(MODELS))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--loop-epochs", type=int, default=None,
                    help="epochs actually run in the in-the-loop mode (extrapolated to --epochs)")
    ap.add_argument("--n-train", type=int, default=256)
    ap.add_argument("--n-eval", type=int, default=64, help="val and test images each")
    ap.add_argument("--n-ref", type=int, default=128, help="reference images for the PCA bases")
    ap.add_argument("--batch", type=int, default=32, help="encoding batch size")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny_clip, 2 epochs (1 in the loop), 32 / 16 / 32 images (checks the script runs)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.models, args.epochs, args.loop_epochs = ["tiny_clip"], 2, 1
        args.n_train, args.n_eval, args.n_ref, args.batch = 32, 16, 32, 16

    rows = []
    try:
        for model in args.models:
            rows.append(measure(model, args))
    except ChildFailed as e:
        print(f"bench_train: {e}", file=sys.stderr)
        return 1
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def measure(model: str, args) -> dict:
    """Both modes of ``model``, each in its own process, and their ratios."""
    c = run_mode("cached", model, args)
    l = run_mode("in_loop", model, args)
    # extrapolate the in-loop training part to the full epoch count (linear in epochs)
    scale = args.epochs / l["epochs_run"]
    loop_total = l["times"]["bases"] + l["times"]["encode"] + l["times"]["train+test"] * scale
    cached_total = sum(c["times"].values())
    # bases are fitted once per (model, reference set) and shared by every method and dataset
    cached_nb = c["times"]["encode"] + c["times"]["train+test"]
    loop_nb = l["times"]["train+test"] * scale
    return dict(model=model, cached_s=cached_total, in_loop_s=loop_total, speedup=loop_total / cached_total,
                speedup_excl_bases=loop_nb / cached_nb,
                cached_peak_mib=c["peak_mib"], in_loop_peak_mib=l["peak_mib"],
                extrapolated=l["epochs_run"] != args.epochs, cached=c, in_loop=l)


def print_table(rows: list[dict], args) -> None:
    print(f"\nResiDual (residual_full), {args.epochs} epochs, train {args.n_train} / val {args.n_eval} / "
          f"test {args.n_eval} / reference {args.n_ref} images, device {rows[0]['cached']['device']}")
    hdr = (f"{'model':10s} {'cached s':>9s} {'in-loop s':>10s} {'speed-up':>9s} {'excl. bases':>12s} "
           f"{'peak MiB cached':>16s} {'peak MiB loop':>14s}")
    print(hdr + "\n" + "-" * len(hdr))
    for r in rows:
        note = f"  (in-loop: {r['in_loop']['epochs_run']} epochs run, extrapolated)" if r["extrapolated"] else ""
        print(f"{r['model']:10s} {r['cached_s']:9.1f} {r['in_loop_s']:10.1f} {r['speedup']:8.1f}x "
              f"{r['speedup_excl_bases']:11.1f}x "
              f"{r['cached_peak_mib']:16.0f} {r['in_loop_peak_mib']:14.0f}{note}")
        print(f"{'':10s} cached stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in r["cached"]["times"].items())
              + " | in-loop stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in r["in_loop"]["times"].items()))
    print(f"memory: {rows[0]['cached']['memory']} per mode (each in a fresh process)")


if __name__ == "__main__":
    sys.exit(main())
