"""Data integrity: fingerprints, guarded image decoding, bad-image scans, split guards.

Provenance. Every :class:`~.registry.ClassificationSplit` a registered builder returns
carries a *provenance* saying where its items come from:

:class:`FileItems`     one image file per item (image_folder, ImageNet, EuroSAT, RESISC45,
                       SUN397, DTD, GTSRB, Stanford Cars)
:class:`SourceFiles`   a few big source files hold every item (CIFAR pickles, MNIST idx,
                       SVHN .mat)
:class:`Synthetic`     generated data, determined by its generator parameters (``shapes_*``)

Fingerprint (:func:`fingerprint`): a small JSON-serialisable dict whose ``sha256`` changes
whenever the data of the split changes:

* files: SHA-256 over ``(path relative to root, size, mtime_ns, label)`` of exactly the
  files of the split, in item order; with ``dataset.content_hash=true`` the SHA-256 of each
  file's bytes replaces ``mtime_ns`` (slower: reads every file);
* source files: the same over the source files, plus the split's item indices and labels;
* synthetic: the generator name, its version constant, its parameters and the labels.

Bad images. :func:`decode_image` opens *and fully decodes* an image (``convert("RGB")``);
any failure becomes a :class:`~.errors.BadImageError` naming the file. Truncated files raise
because PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` stays ``False`` (we refuse to decode when
something set it). :func:`scan_bad_files` decodes a list of files (threads, progress bar);
:func:`skip_bad_images` drops the bad items of a split after the split is determined and
caches the scan next to the stored split files, keyed by the fingerprint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from ..atomic import atomic_write_text
from ..catalog import EVAL_SPLITS
from .errors import BadImageError, DatasetError

log = logging.getLogger(__name__)

__all__ = ["FileItems", "SourceFiles", "Synthetic", "decode_image", "fingerprint",
           "scan_bad_files", "skip_bad_images", "split_problems", "FINGERPRINT_VERSION",
           "PROGRESS_MIN"]

FINGERPRINT_VERSION = 1
SCAN_FORMAT = "residual_exp.bad_images/v1"
PROGRESS_MIN = 1000           # show a progress bar from this many files on
_CHUNK = 1 << 20


# ------------------------------------------------------------------------ provenance

@dataclass(frozen=True)
class FileItems:
    """One image file per base index: ``paths[j]`` is the file of ``base[j]``."""
    root: Path
    paths: Sequence[str]
    kind: str = "files"


@dataclass(frozen=True)
class SourceFiles:
    """Every item is read from these few files (all of the official split's items)."""
    root: Path
    files: Sequence[Path]
    kind: str = "source_files"


@dataclass(frozen=True)
class Synthetic:
    """Deterministic generated data: ``generator`` at ``version`` with ``params``."""
    generator: str
    version: int
    params: Mapping[str, Any] = field(default_factory=dict)
    kind: str = "synthetic"


# --------------------------------------------------------------------------- helpers

def _workers(io_bound: bool) -> int:
    n = os.cpu_count() or 1
    return min(32, 4 * n) if io_bound else max(1, min(16, n))


def _pmap(fn: Callable, items: Sequence, desc: str, io_bound: bool = True,
          chunk: int = 256) -> list:
    """``[fn(x) for x in items]`` in order, threaded in chunks, with a progress bar for long
    lists (PIL decoding and file I/O release the GIL)."""
    from tqdm.auto import tqdm

    items = list(items)
    n = len(items)
    bar = tqdm(total=n, desc=desc, unit="file", disable=n < PROGRESS_MIN, leave=False)
    try:
        if n <= chunk:
            out = []
            for x in items:
                out.append(fn(x))
                bar.update()
            return out

        def run(part: Sequence) -> list:
            return [fn(x) for x in part]
        out = []
        with ThreadPoolExecutor(_workers(io_bound)) as ex:
            for res in ex.map(run, [items[i:i + chunk] for i in range(0, n, chunk)]):
                out.extend(res)
                bar.update(len(res))
        return out
    finally:
        bar.close()


def _rel(path: str, root: Path) -> str:
    """``path`` relative to ``root`` (POSIX separators), or as is when outside it."""
    path, prefix = str(path), str(root).rstrip(os.sep) + os.sep
    if path.startswith(prefix):
        rel = path[len(prefix):]
        return rel.replace(os.sep, "/") if os.sep != "/" else rel
    return Path(path).as_posix()


def _stat_entry(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1                     # missing / unreadable: loading it names the file


def _content_entry(path: str) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
    except OSError:
        return -1, "unreadable"
    return size, h.hexdigest()


def file_entries(paths: Sequence[str], content: bool, desc: str = "fingerprint") -> list[tuple]:
    """Per file ``(size, mtime_ns)`` or, with ``content``, ``(size, sha256)``."""
    return _pmap(_content_entry if content else _stat_entry, list(paths),
                 f"{desc} ({'content' if content else 'size+mtime'})")


def _labels_bytes(targets: Sequence[int]) -> bytes:
    return np.asarray(list(targets), dtype="<i8").tobytes()


# ---------------------------------------------------------------------- fingerprint

def fingerprint_from_entries(rel_paths: Sequence[str], entries: Sequence[tuple],
                             targets: Sequence[int], content: bool) -> dict:
    h = hashlib.sha256(f"residual_exp.fingerprint/v{FINGERPRINT_VERSION} files "
                       f"content={int(content)}\n".encode())
    for rel, entry, label in zip(rel_paths, entries, targets):
        h.update(f"{rel}\0{entry[0]}\0{entry[1]}\0{int(label)}\n".encode())
    return {"kind": "files", "n_files": len(rel_paths), "content_hash": bool(content),
            "sha256": h.hexdigest()}


def _fingerprint_source(prov: SourceFiles, base_idx: Sequence[int], targets: Sequence[int],
                        content: bool, desc: str) -> dict:
    files = [str(f) for f in prov.files]
    entries = file_entries(files, content, desc)
    h = hashlib.sha256(f"residual_exp.fingerprint/v{FINGERPRINT_VERSION} source_files "
                       f"content={int(content)}\n".encode())
    for f, e in zip(files, entries):
        h.update(f"{_rel(f, prov.root)}\0{e[0]}\0{e[1]}\n".encode())
    h.update(b"indices\n" + np.asarray(list(base_idx), dtype="<i8").tobytes())
    h.update(b"labels\n" + _labels_bytes(targets))
    return {"kind": "source_files", "n_files": len(files), "n_items": len(targets),
            "content_hash": bool(content), "sha256": h.hexdigest()}


def _fingerprint_synthetic(prov: Synthetic, targets: Sequence[int]) -> dict:
    params = {str(k): prov.params[k] for k in sorted(prov.params)}
    blob = json.dumps({"generator": prov.generator, "version": prov.version,
                       "params": params}, sort_keys=True, default=str)
    h = hashlib.sha256(f"residual_exp.fingerprint/v{FINGERPRINT_VERSION} synthetic\n".encode())
    h.update(blob.encode() + b"\nlabels\n" + _labels_bytes(targets))
    return {"kind": "synthetic", "generator": prov.generator, "version": prov.version,
            "n_items": len(targets), "sha256": h.hexdigest()}


def _fingerprint_array(base, base_idx: Sequence[int], targets: Sequence[int]) -> dict:
    arr = base.numpy() if hasattr(base, "numpy") and not isinstance(base, np.ndarray) else base
    arr = np.asarray(arr)
    h = hashlib.sha256(f"residual_exp.fingerprint/v{FINGERPRINT_VERSION} array "
                       f"{arr.dtype.str} {arr.shape[1:]}\n".encode())
    for j in base_idx:
        h.update(np.ascontiguousarray(arr[j]).tobytes())
    h.update(b"labels\n" + _labels_bytes(targets))
    return {"kind": "array", "n_items": len(targets), "sha256": h.hexdigest()}


def compute_fingerprint(split_ds) -> dict:
    """The fingerprint of a :class:`~.registry.ClassificationSplit` (not memoised; use
    :func:`fingerprint` or ``split_ds.fingerprint()``)."""
    prov = getattr(split_ds, "provenance", None)
    content = bool(getattr(split_ds, "content_hash", False))
    desc = f"fingerprint {split_ds.name}/{split_ds.split}"
    if isinstance(prov, FileItems):
        entries = split_ds._file_entries()
        return fingerprint_from_entries(split_ds.file_relpaths(), entries, split_ds.targets,
                                        content)
    if isinstance(prov, SourceFiles):
        return _fingerprint_source(prov, split_ds.base_indices(), split_ds.targets, content, desc)
    if isinstance(prov, Synthetic):
        return _fingerprint_synthetic(prov, split_ds.targets)
    base = split_ds.base
    if isinstance(base, np.ndarray) or type(base).__name__ == "Tensor":
        return _fingerprint_array(base, split_ds.base_indices(), split_ds.targets)
    raise DatasetError(
        f"dataset {split_ds.name!r}, split {split_ds.split!r}: cannot fingerprint the split: "
        f"its builder gave no provenance (pass provenance=FileItems(...) / SourceFiles(...) / "
        f"Synthetic(...) to ClassificationSplit in the dataset's builder).")


def fingerprint(split_ds) -> dict:
    """Data fingerprint of a split, memoised on the split object.

    Accepts a :class:`~.registry.ClassificationSplit` or a ``torch.utils.data.Subset`` of
    one (then the subset's indices are hashed in as well).
    """
    from torch.utils.data import Subset

    if isinstance(split_ds, Subset):
        fp = dict(fingerprint(split_ds.dataset))
        h = hashlib.sha256(fp["sha256"].encode() + b"\nsubset\n"
                           + np.asarray(list(split_ds.indices), dtype="<i8").tobytes())
        fp.update({"subset_of": fp["sha256"], "n_subset": len(split_ds.indices),
                   "sha256": h.hexdigest()})
        return fp
    return split_ds.fingerprint()


# ------------------------------------------------------------------------ decoding

def decode_image(path, dataset: str | None = None, split: str | None = None) -> Image.Image:
    """Open and fully decode ``path`` as an RGB PIL image; :class:`BadImageError` otherwise."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise DatasetError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by some imported code): "
            "truncated images would be decoded silently with missing pixels. Remove the "
            "code that sets it (it must stay False); use dataset.skip_bad_images=true to "
            "skip unreadable images instead.")
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")      # forces the full decode inside the guard
    except MemoryError:
        raise
    except Exception as e:               # PIL raises OSError, SyntaxError, ValueError, ...
        if isinstance(e, UnidentifiedImageError):
            reason = "not a recognised image format (UnidentifiedImageError)"
        else:
            reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        try:
            if os.path.getsize(path) == 0:
                reason = "empty file (0 bytes)"
        except OSError:
            pass
        raise BadImageError.for_file(path, reason, dataset, split) from e


def _check_one(path: str) -> str | None:
    try:
        decode_image(path)
    except BadImageError as e:
        return e.reason or "unreadable"
    return None


def scan_bad_files(paths: Sequence[str], desc: str = "decode") -> dict[str, str]:
    """Decode every file (threads, progress bar); ``{path: reason}`` of those that fail."""
    unique = list(dict.fromkeys(paths))
    reasons = _pmap(_check_one, unique, desc, io_bound=False)
    return {p: r for p, r in zip(unique, reasons) if r is not None}


# ------------------------------------------------------------------- skipping

def scan_cache_path(cache_dir: Path, name: str, fp: dict) -> Path:
    return Path(cache_dir) / f"{name}.bad_images.{fp['sha256'][:16]}.json"


def skip_bad_images(split_ds, cache_dir: Path | None):
    """``split_ds`` without its undecodable files (same split membership for the others).

    The scan (a full decode of every file of the split) runs once: its result is stored in
    ``cache_dir`` under the split's fingerprint and reused while the files are unchanged.
    Splits whose items are not individual files (source files, synthetic data) are returned
    as they are.
    """
    if not isinstance(getattr(split_ds, "provenance", None), FileItems):
        return split_ds
    fp = split_ds.fingerprint()
    root = split_ds.provenance.root
    rels = split_ds.file_relpaths()
    path = scan_cache_path(cache_dir, split_ds.name, fp) if cache_dir is not None else None
    bad: dict[str, str] | None = None
    if path is not None and path.is_file():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if record.get("format") == SCAN_FORMAT and record.get("fingerprint") == fp:
                bad = {b["path"]: b["error"] for b in record["bad"]}
        except (OSError, ValueError, KeyError, TypeError):
            bad = None                   # unreadable cache: scan again
    if bad is None:
        found = scan_bad_files(split_ds.file_paths(),
                               f"check images {split_ds.name}/{split_ds.split}")
        bad = {_rel(p, root): r for p, r in found.items()}
        if path is not None:
            record = {"format": SCAN_FORMAT, "dataset": split_ds.name, "split": split_ds.split,
                      "fingerprint": fp, "n_files": len(rels),
                      "bad": [{"path": p, "error": r} for p, r in sorted(bad.items())]}
            try:
                atomic_write_text(path, json.dumps(record, indent=1))
            except OSError as e:
                log.warning("%s/%s: cannot store the bad-image scan in %s (%s); it will run "
                            "again next time", split_ds.name, split_ds.split, path, e)
    if not bad:
        return split_ds
    keep = [k for k, rel in enumerate(rels) if rel not in bad]
    abs_paths = split_ds.file_paths()
    skipped = [abs_paths[k] for k, rel in enumerate(rels) if rel in bad]
    out = split_ds.subset(keep, skipped=skipped)
    shown = "; ".join(f"{p} ({bad[_rel(p, root)]})" for p in skipped[:5])
    more = f"; ... ({len(skipped) - 5} more)" if len(skipped) > 5 else ""
    log.warning("dataset %r, split %r: skipped %d unreadable image%s of %d "
                "(dataset.skip_bad_images=true): %s%s%s", split_ds.name, split_ds.split,
                len(skipped), "" if len(skipped) == 1 else "s", len(rels), shown, more,
                f" (full list: {path})" if path is not None else "")
    return out


# --------------------------------------------------------------------- guards

def class_counts(targets: Iterable[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for t in targets:
        out[int(t)] = out.get(int(t), 0) + 1
    return dict(sorted(out.items()))


def split_problems(splits: Mapping[str, Any], classnames: Sequence[str]) -> list[str]:
    """Label-level problems of a dataset's splits (for reports): empty splits, single-class
    splits, classes of val/test that train lacks, fewer than two classes."""
    out = []
    if len(classnames) < 2:
        out.append(f"the dataset declares {len(classnames)} class(es); at least 2 are needed")
    train = splits.get("train")
    train_labels = set(train.targets) if train is not None else None
    for name, ds in splits.items():
        counts = class_counts(ds.targets)
        if not counts:
            out.append(f"split {name!r} is empty")
            continue
        if len(counts) == 1:
            (t, c), = counts.items()
            out.append(f"split {name!r} has a single class: {_name(classnames, t)} ({c} images)")
        if name in EVAL_SPLITS and train_labels is not None:
            missing = {t: c for t, c in counts.items() if t not in train_labels}
            if missing:
                shown = ", ".join(f"{_name(classnames, t)} ({c} images)"
                                  for t, c in list(missing.items())[:10])
                out.append(f"split {name!r} has {len(missing)} class(es) that never occur in "
                           f"train: {shown}")
    return out


def _name(classnames: Sequence[str], t: int) -> str:
    return classnames[t] if 0 <= t < len(classnames) else f"label {t}"
