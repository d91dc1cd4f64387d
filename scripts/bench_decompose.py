"""Cost of the decomposition: decomposed forward ÷ plain forward, in time and peak memory.

For open_clip ViT-B/16 and ViT-L/14 with random weights (no download), on CPU or CUDA::

    .venv/bin/python scripts/bench_decompose.py --batch-b 8 --batch-l 4 --repeats 3
    .venv/bin/python scripts/bench_decompose.py --smoke     # the tiny CLIP, batch 2 (checks the script runs)

Time: one warm-up call of each, then ``--repeats`` interleaved plain/decomposed calls
(``torch.no_grad``); the table shows medians.  "decomposed" is ``backbone.decompose`` (the
hooked forward *and* building the ``[B, U, D]`` unit stack), so the ratio is the full price.

Peak memory, what is measured:

* CUDA: ``torch.cuda.max_memory_allocated`` during the call minus the allocation before it
  (tensor memory held by PyTorch's caching allocator; weights excluded).
* CPU: PyTorch has no CPU allocator statistics, and glibc keeps freed memory resident, so
  the resident set of a warm process does not move.  The script therefore re-runs itself in
  a child process with ``MALLOC_MMAP_THRESHOLD_=65536`` (every block ≥ 64 KiB — all
  activations — is mmapped and returned to the OS when freed, so the resident set follows
  the live tensors) and measures, after a warm-up, the growth of the peak resident set
  (``VmHWM`` in ``/proc/self/status``, reset by writing ``5`` to ``/proc/self/clear_refs``)
  over the resident size before the call: the peak of live activation memory (+ small
  allocator slack), weights excluded.  Linux ≥ 4.0 only; ``n/a`` elsewhere.

On CUDA the two models also run under ``torch.autocast(bfloat16)``: the hooked forward runs in
bf16 and the per-unit math (W_O, LayerNorm lens, projection) is done in fp32 from the stored
bf16 activations (``decomposing()`` + ``_units`` on fp32 copies).  The goal is a time ratio
≤ 1.05.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from residual_exp.backbones.open_clip_backbone import OpenClipBackbone, create_open_clip  # noqa: E402
from residual_exp.backbones.tiny_clip import ARCH as TINY_ARCH, create_tiny_clip  # noqa: E402
from residual_exp.decompose.hooks import count_hooks  # noqa: E402

MODELS = [("ViT-B/16", "ViT-B-16"), ("ViT-L/14", "ViT-L-14")]
TINY = ("tiny CLIP", TINY_ARCH)          # --smoke: the embedded tiny CLIP's architecture, random weights


def backbone(name: str, arch: str) -> OpenClipBackbone:
    """Random weights (seeded) of an open_clip architecture or of the tiny CLIP."""
    torch.manual_seed(0)
    if arch == TINY[1]:
        model, transform, tok = create_tiny_clip(None)
        return OpenClipBackbone(name, model, transform, tok, int(model.visual.image_size[0]))
    model, transform, tok = create_open_clip(arch, None, None, None, None)
    return OpenClipBackbone(name, model, transform, tok, 224)


# --- memory probes ----------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(fn, device: torch.device) -> tuple[float, float | None]:
    """``(seconds, peak extra bytes)`` of one call of ``fn``; on CPU the bytes are only
    meaningful in the memory-probe child (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        return dt, float(torch.cuda.max_memory_allocated(device) - base)
    ok = _reset_peak_rss()
    base = _status_kb("VmRSS")
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    if not ok or base is None or peak is None:
        return dt, None
    return dt, float(max(peak - base, 0) * 1024)


MEM_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def cpu_memory(arch: str, batch: int) -> dict[str, float | None]:
    """Peak activation memory of the plain and decomposed forward, from a child process."""
    env = {**os.environ, **MEM_ENV}
    out = subprocess.run([sys.executable, __file__, "--_mem-probe", arch, str(batch)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _mem_probe(arch: str, batch: int) -> None:
    """Child: warm up both forwards, then one measured call of each; prints JSON bytes."""
    bb = backbone(arch, arch).eval()
    x = torch.randn(batch, 3, bb.image_size, bb.image_size)
    res = {}
    with torch.no_grad():
        bb.encode_image(x), bb.decompose(x)                                # warm-up
        for key, fn in (("plain", lambda: bb.encode_image(x)), ("dec", lambda: bb.decompose(x))):
            res[key] = measure(fn, torch.device("cpu"))[1]
    print(json.dumps(res))


# --- the two forwards ---------------------------------------------------------------------
def decompose_mixed(bb: OpenClipBackbone, images: torch.Tensor):
    """bf16 autocast forward, fp32 unit math from the stored activations."""
    with bb.decomposing() as store:
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            feature = bb.encode_image(images)
        fp32 = {k: ([t.float() for t in v] if isinstance(v, list) else v.float()) for k, v in store.items()}
        units = bb._units(fp32)                                           # [B, U, D] in fp32
    return units, feature.float()


def bench(name: str, arch: str, batch: int, repeats: int, device: torch.device, mixed: bool) -> dict:
    bb = backbone(name, arch).to(device).eval()
    x = torch.randn(batch, 3, bb.image_size, bb.image_size, device=device)
    def plain():
        with torch.autocast(device.type, dtype=torch.bfloat16) if mixed else contextlib.nullcontext():
            return bb.encode_image(x)

    def dec():
        return decompose_mixed(bb, x) if mixed else bb.decompose(x)

    times: dict[str, list[float]] = {"plain": [], "dec": []}
    mems: dict[str, list[float]] = {"plain": [], "dec": []}
    with torch.no_grad():
        plain()                                                           # warm-up
        units, feature = dec()
        for _ in range(repeats):                                          # interleaved
            for key, fn in (("plain", plain), ("dec", dec)):
                t, m = measure(fn, device)
                times[key].append(t)
                if m is not None:
                    mems[key].append(m)
    assert count_hooks(bb) == 0, "hooks left behind"
    rel = ((units.sum(1) - feature).abs().amax(-1) / feature.abs().amax(-1)).max().item()
    t_p, t_d = statistics.median(times["plain"]), statistics.median(times["dec"])
    n_units = units.shape[1]
    if device.type == "cuda":
        m_p, m_d = statistics.median(mems["plain"]), statistics.median(mems["dec"])
    else:
        del bb, x, units, feature                                         # free RAM for the child
        probe = cpu_memory(arch, batch)
        m_p, m_d = probe["plain"], probe["dec"]
    return dict(model=name, precision="bf16+fp32 units" if mixed else "fp32", batch=batch, units=n_units,
                t_plain=t_p, t_dec=t_d, ratio=t_d / t_p, m_plain=m_p, m_dec=m_d,
                m_ratio=(m_d / m_p) if (m_p and m_d is not None) else None, rel=rel)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--_mem-probe"]:                                     # internal: memory child
        _mem_probe(argv[1], int(argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-b", type=int, default=8, help="images per forward for ViT-B/16")
    ap.add_argument("--batch-l", type=int, default=4, help="images per forward for ViT-L/14")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--models", default="B,L", help="which of B (ViT-B/16), L (ViT-L/14) to run")
    ap.add_argument("--smoke", action="store_true", help="the tiny CLIP only, batch 2, 1 repeat")
    args = ap.parse_args(argv)
    runs = [(name, arch, args.batch_b if tag == "B" else args.batch_l)
            for tag, (name, arch) in zip("BL", MODELS) if tag in args.models.split(",")]
    if args.smoke:
        runs, args.repeats, args.device = [(*TINY, 2)], 1, "cpu"
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                       else ("cpu" if args.device == "auto" else args.device))
    mem_what = ("peak allocated (torch.cuda)" if dev.type == "cuda"
                else "peak RSS growth in a child with mmapped allocations (/proc VmHWM)")
    print(f"device {dev}" + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda"
                             else f", {torch.get_num_threads()} threads, {os.cpu_count()} cores")
          + f"; torch {torch.__version__}; memory = {mem_what}; times are medians of {args.repeats}")
    rows = []
    for name, arch, batch in runs:
        rows.append(bench(name, arch, batch, args.repeats, dev, mixed=False))
        if dev.type == "cuda":
            rows.append(bench(name, arch, batch, args.repeats, dev, mixed=True))

    def mb(v):
        return "n/a" if v is None else f"{v / 2**20:.0f} MiB"

    head = (f"{'model':<9} {'precision':<16} {'batch':>5} {'units':>5} {'plain':>9} {'decomposed':>10} "
            f"{'time ×':>7} {'mem plain':>10} {'mem dec.':>10} {'mem ×':>6} {'rel err':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<9} {r['precision']:<16} {r['batch']:>5} {r['units']:>5} {r['t_plain'] * 1e3:>7.0f}ms "
              f"{r['t_dec'] * 1e3:>8.0f}ms {r['ratio']:>7.3f} {mb(r['m_plain']):>10} {mb(r['m_dec']):>10} "
              f"{'n/a' if r['m_ratio'] is None else format(r['m_ratio'], '.2f'):>6} {r['rel']:>9.1e}")
    worst = max(r["ratio"] for r in rows)
    print(f"worst time ratio {worst:.3f} (goal ≤ 1.05)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
