"""``task=check_decomposition``: does Σ units reproduce the model's image feature, and is every
unit the one the formula defines?

Builds ``model=…``, runs a batch of random images at the backbone's input size and checks:

1. **sum**: ``‖Σ_u units − feature‖∞ / ‖feature‖∞`` (per sample, max over the batch) under the
   convention chosen with ``conventions.units=official|centred``;
2. **per unit**: every unit against the *independent recomputation* its backbone family registers
   (:mod:`residual_exp.decompose.references`: no hooks, no lens, every token's pieces re-run block
   by block with an explicit softmax, the readout — CLS token, average or attention pool —
   written out per token).  Prints the max per-unit error ``max_u ‖unit_u − ref_u‖∞ / ‖feature‖∞``
   and the worst unit; a family without a reference prints that it was skipped;
3. the decomposed forward does not change the feature and leaves no hook behind.

**Random weights are perturbed** (:func:`~residual_exp.decompose.references.perturb_1d`): with
``model.pretrained=null`` (and no ``model.weights``) every 1-D parameter of the image tower and
the cls/pos/register tokens get ``ε ~ N(0, (0.1·max(1, |p|))²)`` from a generator seeded with
``task.seed`` — at random init they are 0/1 and a readout that dropped them would pass.

Returns 0 when every error is within ``task.tolerance`` and no hook remains, else 1 (``FAIL``
lines).  An unsupported architecture raises :class:`~residual_exp.backbones.UnsupportedArchitecture`
before anything is loaded.  Example::

    python -m residual_exp task=check_decomposition model=open_clip model.arch=ViT-B-16-SigLIP model.pretrained=null
"""
from __future__ import annotations

import time

import torch

from ..backbones import build_backbone, reference_of
from ..decompose import references
from ..decompose.hooks import count_hooks
from ..decompose.references import PERTURB_SCALE, reference_units
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


@torch.no_grad()
def measure(backbone, images: torch.Tensor, convention: str, device=None) -> dict:
    """The check's numbers: Σ-units errors, per-unit errors against the family's reference (None
    when it has none), the drift of the decomposed forward, and the times of both forwards."""
    device = device or images.device
    plain, t_plain = _timed(lambda: backbone.encode_image(images), device)
    (units, feature), t_dec = _timed(lambda: backbone.decompose(images), device)
    layout = backbone.layout
    assert units.shape == (images.shape[0], len(layout), backbone.output_dim), units.shape
    norm = feature.abs().amax(-1).clamp_min(1e-30)                        # [B] per-sample ∞-norms
    diff = units.sum(1) - feature                                         # [B, D]
    out = dict(abs_err=diff.abs().max().item(), rel_err=(diff.abs().amax(-1) / norm).max().item(),
               drift=(feature - plain).abs().max().item(), scale=max(feature.abs().max().item(), 1e-30),
               t_plain=t_plain, t_dec=t_dec, unit_err=None, ref_err=None, worst=None, picks={})
    ref = reference_of(backbone, images)
    if ref is not None:
        want = reference_units(ref, convention)                           # [B, U, D]
        per_unit = ((units - want).abs().amax(-1) / norm[:, None]).amax(0)   # [U]
        picks = [n for n in ("embed", "L0H0", f"L{layout.num_layers - 1}H{layout.num_heads - 1}",
                             f"L{layout.num_layers // 2}.mlp", "pool.mlp") if n in layout.names]
        out.update(ref_err=((ref.feature() - feature).abs().amax(-1) / norm).max().item(),
                   unit_err=per_unit.max().item(), worst=layout.names[int(per_unit.argmax())],
                   picks={n: per_unit[layout.index(n)].item() for n in picks})
    return out


def check_decomposition(cfg) -> int:
    """``cfg`` is the full Hydra config; ``cfg.model``, ``cfg.task`` and ``cfg.conventions`` are used."""
    task = cfg.task
    if task.dtype not in DTYPES:
        raise ValueError(f"task.dtype={task.dtype!r}; valid: {sorted(DTYPES)}")
    dtype, device = DTYPES[task.dtype], torch.device(resolve_device(cfg.get("device", "auto")))
    torch.manual_seed(int(task.seed))
    tol = float(task.tolerance)

    backbone = build_backbone(cfg.model)
    random_weights = cfg.model.get("pretrained") is None and not cfg.model.get("weights")
    n_perturbed = references.perturb_1d(backbone.vision, int(task.seed)) if random_weights else 0
    backbone = backbone.to(device=device, dtype=dtype).eval()
    convention = (cfg.get("conventions") or {}).get("units", "official")
    backbone.use_convention(convention)
    hooks_before = count_hooks(backbone)
    layout = backbone.layout
    print(f"model: {backbone.name} ({backbone.family}), {backbone.image_size} px, output {backbone.output_dim}-d, "
          f"{backbone.pooling().kind} readout, {task.dtype} on {device}")
    if random_weights:
        print(f"perturbed 1-D parameters: {n_perturbed} tensors, N(0, {PERTURB_SCALE:g}·max(1,|p|)) seeded "
              f"{int(task.seed)} (biases, norm affines, LayerScale, cls/pos/reg tokens of the image tower)")
    else:
        print("pretrained weights: not perturbed")
    print(f"units ({convention} convention): {len(layout)} = "
          + " + ".join(f"{n} {k}" for k, n in layout.counts().items()))

    images = torch.randn(int(task.batch_size), 3, backbone.image_size, backbone.image_size,
                         generator=torch.Generator().manual_seed(int(task.seed)), dtype=dtype).to(device)
    r = measure(backbone, images, convention, device)
    print(f"max |Σ units − feature|        = {r['abs_err']:.3e}")
    print(f"max relative error (∞-norm)    = {r['rel_err']:.3e}   (tolerance {tol:.1e})")
    if r["unit_err"] is None:
        print(f"per-unit check: no independent recomputation for the {backbone.family} family; skipped")
    else:
        print(f"max per-unit error (all {len(layout)} units vs an independent recomputation, ∞-norm / ‖feature‖∞) "
              f"= {r['unit_err']:.3e}   (worst: {r['worst']})")
        print("  " + ", ".join(f"{n} {e:.1e}" for n, e in r["picks"].items())
              + f"; reference forward vs feature {r['ref_err']:.1e}")
    print(f"decomposed vs plain feature    = {r['drift']:.3e}")
    print(f"time: plain {r['t_plain'] * 1e3:.1f} ms, decomposed {r['t_dec'] * 1e3:.1f} ms "
          f"(×{r['t_dec'] / max(r['t_plain'], 1e-12):.2f}, first calls: includes warm-up)")
    hooks_after = count_hooks(backbone)
    print(f"hooks: {hooks_before} before, {hooks_after} after")
    rel_err, ref_err, unit_err, worst, drift = r["rel_err"], r["ref_err"], r["unit_err"], r["worst"], r["drift"]

    fails = []
    if not rel_err <= tol:                                                # also catches NaN
        fails.append(f"relative error {rel_err:.3e} exceeds tolerance {tol:.1e}")
    if ref_err is not None and not ref_err <= tol:
        fails.append(f"the independent recomputation does not reproduce the feature ({ref_err:.3e}): "
                     "the per-unit check cannot be trusted")
    if unit_err is not None and not unit_err <= tol:
        fails.append(f"per-unit error {unit_err:.3e} exceeds tolerance {tol:.1e} (worst unit {worst})")
    if drift > tol * r["scale"]:
        fails.append(f"the decomposed forward changed the feature by {drift:.3e}")
    if hooks_after != hooks_before:
        fails.append(f"{hooks_after - hooks_before} hook(s) left behind after decompose()")
    for f in fails:
        print(f"FAIL: {f}")
    if not fails:
        print("OK")
    return 1 if fails else 0
