"""``task=check_decomposition``: does Σ units reproduce the model's image feature?

Builds ``model=…`` (random weights with ``model.pretrained=null``), runs a batch of random
images at the backbone's input size, and prints the unit counts by kind, the max absolute
error and the max relative error ``‖Σ_u units − feature‖∞ / ‖feature‖∞`` (per sample, max
over the batch), the time of the decomposed and of the plain forward, and whether any hook
was left behind.  Returns 0 when the relative error is within ``task.tolerance`` and no hook
remains, else 1 (with a ``FAIL`` line).

Example::

    python -m residual_exp task=check_decomposition model=clip_b model.pretrained=null
"""
from __future__ import annotations

import time

import torch

from ..backbones import build_backbone
from ..decompose.hooks import count_hooks
from ..runtime import resolve_device

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def check_decomposition(cfg) -> int:
    """``cfg`` is the full Hydra config; ``cfg.model`` and ``cfg.task`` are used."""
    task = cfg.task
    if task.dtype not in DTYPES:
        raise ValueError(f"task.dtype={task.dtype!r}; valid: {sorted(DTYPES)}")
    dtype, device = DTYPES[task.dtype], torch.device(resolve_device(cfg.get("device", "auto")))
    torch.manual_seed(int(task.seed))

    backbone = build_backbone(cfg.model).to(device=device, dtype=dtype).eval()
    backbone.use_convention(cfg.get("conventions", {}).get("units", "official"))
    hooks_before = count_hooks(backbone)
    layout = backbone.layout
    counts = layout.counts()
    print(f"model: {backbone.name} ({backbone.family}), {backbone.image_size} px, output {backbone.output_dim}-d, "
          f"{task.dtype} on {device}")
    print(f"units: {len(layout)} = " + " + ".join(f"{n} {k}" for k, n in counts.items()))

    images = torch.randn(int(task.batch_size), 3, backbone.image_size, backbone.image_size,
                         generator=torch.Generator().manual_seed(int(task.seed)), dtype=dtype).to(device)
    with torch.no_grad():
        plain, t_plain = _timed(lambda: backbone.encode_image(images), device)
        (units, feature), t_dec = _timed(lambda: backbone.decompose(images), device)
    hooks_after = count_hooks(backbone)

    assert units.shape == (images.shape[0], len(layout), backbone.output_dim), units.shape
    diff = units.sum(1) - feature                                         # [B, D]
    abs_err = diff.abs().max().item()
    rel_err = (diff.abs().amax(-1) / feature.abs().amax(-1).clamp_min(1e-30)).max().item()  # per-sample ∞-norms
    drift = (feature - plain).abs().max().item()                          # hooks must not change the output
    print(f"max |Σ units − feature|        = {abs_err:.3e}")
    print(f"max relative error (∞-norm)    = {rel_err:.3e}   (tolerance {task.tolerance:.1e})")
    print(f"decomposed vs plain feature    = {drift:.3e}")
    print(f"time: plain {t_plain * 1e3:.1f} ms, decomposed {t_dec * 1e3:.1f} ms "
          f"(×{t_dec / max(t_plain, 1e-12):.2f}, first calls: includes warm-up)")
    print(f"hooks: {hooks_before} before, {hooks_after} after")

    ok = True
    if not rel_err <= float(task.tolerance):                              # also catches NaN
        print(f"FAIL: relative error {rel_err:.3e} exceeds tolerance {task.tolerance:.1e}")
        ok = False
    if drift > float(task.tolerance) * max(feature.abs().max().item(), 1e-30):
        print(f"FAIL: the decomposed forward changed the feature by {drift:.3e}")
        ok = False
    if hooks_after != hooks_before:
        print(f"FAIL: {hooks_after - hooks_before} hook(s) left behind after decompose()")
        ok = False
    if ok:
        print("OK")
    return 0 if ok else 1
