"""``task=predict model_dir=DIR inputs=PATH``: classify images with an export (``task=export``).

``inputs`` is an image, a folder (searched recursively for image files) or a glob.  Writes, into
``task.out_dir`` (default: the run dir), ``predictions.csv`` — one row per image: its path and the
top-``task.top_k`` classes with their probabilities (softmax of the export's logits) — and
``predictions.png``, a grid of the first ``task.grid`` images titled with their top-1 class.
Both are written only when every image was classified (temp file + rename): an unreadable image
stops the task with one message naming the file (exit 2) and leaves nothing behind.
"""
from __future__ import annotations

import glob
import logging
from pathlib import Path

import torch

from ..data.errors import BadImageError, DatasetError
from ..data.integrity import decode_image
from ..runtime import resolve_device, run_dir_of
from ..tables import csv_text, text_table

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def find_images(inputs: str) -> list[Path]:
    """The image files ``inputs`` names: one file, a folder (recursive) or a glob (sorted)."""
    p = Path(inputs).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = [f for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                 and not any(part.startswith(".") for part in f.relative_to(p).parts)]   # ._x.jpg, .git/
        where = f"folder {p}"
    else:
        files = [Path(f) for f in sorted(glob.glob(str(p), recursive=True))
                 if Path(f).is_file() and Path(f).suffix.lower() in IMAGE_SUFFIXES]
        where = f"glob {inputs!r}" if glob.has_magic(inputs) else f"path {inputs!r} (no such file or folder)"
    if not files:
        raise DatasetError(f"inputs={inputs}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the {where}")
    return files


def _decode(path: Path):
    try:
        return decode_image(path)
    except BadImageError as e:
        raise BadImageError(f"inputs: cannot decode image file '{path}' ({e.reason or e}); fix or remove it "
                            "(nothing was written)", path=str(path), reason=e.reason) from None


@torch.no_grad()
def predict_files(model, files: list[Path], top_k: int, batch_size: int, progress: bool = True) -> list[dict]:
    """One row per file: ``path``, then ``top{i}`` / ``p{i}`` for i = 1 … top_k."""
    from tqdm.auto import tqdm
    k = min(top_k, len(model.classnames))
    device = next(model.parameters()).device
    rows = []
    with tqdm(total=len(files), desc="predict", unit="img", disable=not progress or len(files) < 2 * batch_size) as bar:
        for i in range(0, len(files), batch_size):
            chunk = files[i:i + batch_size]
            images = torch.stack([model.preprocess(_decode(f)) for f in chunk]).to(device)
            probs = model(images).float().softmax(-1)                          # [B, C]
            p, idx = probs.topk(k, dim=-1)
            for f, pi, ii in zip(chunk, p.tolist(), idx.tolist()):
                row = {"path": str(f)}
                for j, (pj, cj) in enumerate(zip(pi, ii), 1):
                    row[f"top{j}"], row[f"p{j}"] = model.classnames[cj], round(pj, 6)
                rows.append(row)
            bar.update(len(chunk))
    return rows


def grid_figure(files: list[Path], rows: list[dict], n: int):
    """A figure of the first ``n`` images, each titled with its top-1 class and probability."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = min(n, len(files))
    cols = min(4, n)
    lines = (n + cols - 1) // cols
    fig, axes = plt.subplots(lines, cols, figsize=(3 * cols, 3.2 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, f, row in zip(axes.flat, files[:n], rows[:n]):
        img = _decode(f)
        img.thumbnail((256, 256))
        ax.imshow(img)
        ax.set_title(f"{row['top1']} ({row['p1']:.2f})\n{f.name}", fontsize=9)
    fig.tight_layout()
    return fig


SHOWN = 10              # rows printed on the console (all of them are in predictions.csv)


def predict(cfg) -> int:
    from ..atomic import atomic_write_text, save_figure
    from ..errors import writable_dir
    from ..export import load_adapted
    task = cfg.task
    out = Path(str(task.out_dir)).expanduser() if task.get("out_dir") else run_dir_of(cfg)
    writable_dir(out, "task.out_dir")                        # before any work
    files = find_images(str(cfg.inputs))
    model = load_adapted(str(cfg.model_dir), device=resolve_device(cfg.device), verify=bool(task.verify_export))
    rows = predict_files(model, files, int(task.top_k), int(task.batch_size), bool(cfg.trainer.progress_bar))
    out.mkdir(parents=True, exist_ok=True)
    fig = grid_figure(files, rows, int(task.grid)) if int(task.grid) > 0 else None
    atomic_write_text(out / "predictions.csv", csv_text(rows))
    if fig is not None:
        import matplotlib.pyplot as plt
        save_figure(fig, out / "predictions.png", dpi=100)
        plt.close(fig)
    shown = [{"image": Path(r["path"]).name, "top1": r["top1"], "p1": f"{r['p1']:.3f}"} for r in rows[:SHOWN]]
    print(text_table(shown, ["image", "top1", "p1"]))
    if len(rows) > SHOWN:
        print(f"… the first {SHOWN} of {len(rows)} images; every row is in predictions.csv")
    print(f"{len(rows)} images → {out / 'predictions.csv'}" + (f", {out / 'predictions.png'}" if fig else ""))
    return 0
