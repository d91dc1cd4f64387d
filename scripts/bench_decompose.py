"""Cost of the decomposition: decomposed forward ÷ plain forward, in time and peak memory.

For open_clip ViT-B/16 and ViT-L/14 (CLS readout) and SigLIP B/16 (attention-pooled readout,
``ViT-B-16-SigLIP``) with random weights (no download), on CPU or CUDA::

    .venv/bin/python scripts/bench_decompose.py --batch-b 8 --batch-l 4 --batch-s 8 --repeats 3
    .venv/bin/python scripts/bench_decompose.py --models S          # the SigLIP row only
    .venv/bin/python scripts/bench_decompose.py --smoke             # 64 px, batch 2, one repeat

Time: one warm-up call of each, then ``--repeats`` interleaved plain/decomposed calls
(``torch.no_grad``); the table shows medians, and the ratio of the fastest calls (``min ×``: on
a machine shared with other jobs the least disturbed call of each is the fairest comparison) and
of the process CPU times (``cpu ×``, medians: on a loaded machine wall times mostly measure the
scheduler; ``--threads 1`` makes CPU time the work done).  "decomposed" is ``backbone.decompose`` (the
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

On CUDA the models also run under ``torch.autocast(bfloat16)``: the hooked forward runs in
bf16 and the per-unit math (W_O, LayerNorm lens, projection) is done in the weights' fp32 from the
stored bf16 activations (``backbone.precision = "bf16"``, as the encoding stage does).  The goal is
a time ratio ≤ 1.05 for the CLS readouts and ≤ 1.10 for SigLIP's attention pool (its decomposed
forward keeps every token of every layer until the pool's attention weights and the per-token
norm statistics are known, then weights them: more memory, a little more time).
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
from residual_exp.decompose.hooks import count_hooks  # noqa: E402

MODELS = {"B": ("ViT-B/16", "ViT-B-16"), "L": ("ViT-L/14", "ViT-L-14"), "S": ("SigLIP B/16", "ViT-B-16-SigLIP")}


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


def measure(fn, device: torch.device) -> tuple[float, float | None, float]:
    """``(seconds, peak extra bytes, CPU seconds)`` of one call of ``fn``; on CPU the bytes are
    only meaningful in the memory-probe child (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        return dt, float(torch.cuda.max_memory_allocated(device) - base), time.process_time() - c0
    ok = _reset_peak_rss()
    base = _status_kb("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    dt, ct = time.perf_counter() - t0, time.process_time() - c0
    peak = _status_kb("VmHWM")
    if not ok or base is None or peak is None:
        return dt, None, ct
    return dt, float(max(peak - base, 0) * 1024), ct


MEM_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def cpu_memory(arch: str, batch: int, size: int | None) -> dict[str, float | None]:
    """Peak activation memory of the plain and decomposed forward, from a child process."""
    env = {**os.environ, **MEM_ENV}
    out = subprocess.run([sys.executable, __file__, "--_mem-probe", arch, str(batch), str(size or 0)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _backbone(name: str, arch: str, size: int | None) -> OpenClipBackbone:
    model, transform, tok = create_open_clip(arch, None, None, size, None)
    return OpenClipBackbone(name, model, transform, tok, size or 224).eval()


def _mem_probe(arch: str, batch: int, size: int) -> None:
    """Child: warm up both forwards, then one measured call of each; prints JSON bytes."""
    torch.manual_seed(0)
    bb = _backbone(arch, arch, size or None)
    x = torch.randn(batch, 3, bb.image_size, bb.image_size)
    res = {}
    with torch.no_grad():
        bb.encode_image(x), bb.decompose(x)                                # warm-up
        for key, fn in (("plain", lambda: bb.encode_image(x)), ("dec", lambda: bb.decompose(x))):
            res[key] = measure(fn, torch.device("cpu"))[1]
    print(json.dumps(res))


# --- the two forwards ---------------------------------------------------------------------
def decompose_mixed(bb: OpenClipBackbone, images: torch.Tensor):
    """bf16 autocast forward (CUDA), fp32 unit math from the stored activations."""
    bb.precision = "bf16"
    try:
        return bb.decompose(images)
    finally:
        bb.precision = "fp32"


def bench(name: str, arch: str, batch: int, repeats: int, device: torch.device, mixed: bool,
          size: int | None = None) -> dict:
    torch.manual_seed(0)
    bb = _backbone(name, arch, size).to(device)
    x = torch.randn(batch, 3, bb.image_size, bb.image_size, device=device)
    def plain():
        with torch.autocast(device.type, dtype=torch.bfloat16) if mixed else contextlib.nullcontext():
            return bb.encode_image(x)

    def dec():
        return decompose_mixed(bb, x) if mixed else bb.decompose(x)

    times: dict[str, list[float]] = {"plain": [], "dec": []}
    cpus: dict[str, list[float]] = {"plain": [], "dec": []}
    mems: dict[str, list[float]] = {"plain": [], "dec": []}
    with torch.no_grad():
        plain()                                                           # warm-up
        units, feature = dec()
        for _ in range(repeats):                                          # interleaved
            for key, fn in (("plain", plain), ("dec", dec)):
                t, m, c = measure(fn, device)
                times[key].append(t)
                cpus[key].append(c)
                if m is not None:
                    mems[key].append(m)
    assert count_hooks(bb) == 0, "hooks left behind"
    readout = bb.pooling().kind
    rel = ((units.sum(1) - feature).abs().amax(-1) / feature.abs().amax(-1)).max().item()
    t_p, t_d = statistics.median(times["plain"]), statistics.median(times["dec"])
    min_ratio = min(times["dec"]) / min(times["plain"])
    cpu_ratio = statistics.median(cpus["dec"]) / statistics.median(cpus["plain"])
    n_units = units.shape[1]
    if device.type == "cuda":
        m_p, m_d = statistics.median(mems["plain"]), statistics.median(mems["dec"])
    else:
        del bb, x, units, feature                                         # free RAM for the child
        probe = cpu_memory(arch, batch, size)
        m_p, m_d = probe["plain"], probe["dec"]
    return dict(model=name, precision="bf16+fp32 units" if mixed else "fp32", batch=batch, units=n_units,
                readout=readout,
                t_plain=t_p, t_dec=t_d, ratio=t_d / t_p, min_ratio=min_ratio, cpu_ratio=cpu_ratio, m_plain=m_p, m_dec=m_d,
                m_ratio=(m_d / m_p) if (m_p and m_d is not None) else None, rel=rel)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--_mem-probe"]:                                     # internal: memory child
        _mem_probe(argv[1], int(argv[2]), int(argv[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-b", type=int, default=8, help="images per forward for ViT-B/16")
    ap.add_argument("--batch-l", type=int, default=4, help="images per forward for ViT-L/14")
    ap.add_argument("--batch-s", type=int, default=8, help="images per forward for SigLIP B/16")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--models", default="B,L,S", help="which of B (ViT-B/16), L (ViT-L/14), S (SigLIP B/16) to run")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--smoke", action="store_true", help="64 px, batch 2, one repeat (checks that the script runs)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = 64 if args.smoke else None
    if args.smoke:
        args.batch_b = args.batch_l = args.batch_s = 2
        args.repeats = 1
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                       else ("cpu" if args.device == "auto" else args.device))
    mem_what = ("peak allocated (torch.cuda)" if dev.type == "cuda"
                else "peak RSS growth in a child with mmapped allocations (/proc VmHWM)")
    print(f"device {dev}" + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda"
                             else f", {torch.get_num_threads()} threads, {os.cpu_count()} cores")
          + f"; torch {torch.__version__}; memory = {mem_what}; times are medians of {args.repeats}")
    rows = []
    for tag in args.models.split(","):
        name, arch = MODELS[tag]
        batch = {"B": args.batch_b, "L": args.batch_l, "S": args.batch_s}[tag]
        rows.append(bench(name, arch, batch, args.repeats, dev, mixed=False, size=size))
        if dev.type == "cuda":
            rows.append(bench(name, arch, batch, args.repeats, dev, mixed=True, size=size))

    def mb(v):
        return "n/a" if v is None else f"{v / 2**20:.0f} MiB"

    head = (f"{'model':<11} {'readout':<7} {'precision':<16} {'batch':>5} {'units':>5} {'plain':>9} {'decomposed':>10} "
            f"{'time ×':>7} {'min ×':>6} {'cpu ×':>6} {'mem plain':>10} {'mem dec.':>10} {'mem ×':>6} {'rel err':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<11} {r['readout']:<7} {r['precision']:<16} {r['batch']:>5} {r['units']:>5} "
              f"{r['t_plain'] * 1e3:>7.0f}ms "
              f"{r['t_dec'] * 1e3:>8.0f}ms {r['ratio']:>7.3f} {r['min_ratio']:>6.3f} {r['cpu_ratio']:>6.3f} {mb(r['m_plain']):>10} {mb(r['m_dec']):>10} "
              f"{'n/a' if r['m_ratio'] is None else format(r['m_ratio'], '.2f'):>6} {r['rel']:>9.1e}")
    for readout, goal in (("token", 1.05), ("map", 1.10)):
        sel = [r for r in rows if r["readout"] == readout]
        if sel:
            print(f"worst time ratio, {readout} readout: median {max(r['ratio'] for r in sel):.3f}, fastest calls "
                  f"{max(r['min_ratio'] for r in sel):.3f}, CPU time {max(r['cpu_ratio'] for r in sel):.3f} "
                  f"(goal ≤ {goal:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
