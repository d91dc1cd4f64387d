"""``inspect_data``: what a ``dataset=...`` config resolves to on this machine.

Prints split sizes, the number of classes, a few class names and the first prompt
templates; when the data is missing, prints the layout expected under ``dataset.root`` and
how to obtain it.  Building the train/val splits stores the dataset's split file if it did
not exist yet.

It also reports, from the labels alone, empty splits, single-class splits and classes of
val/test that never occur in train.  With ``task.verify=true`` it opens and fully decodes
every image of every split (progress bar), lists the files that cannot be decoded and
prints the class counts of every split.

Returns 0 when everything is fine, 1 when the data is missing or unreadable or anything
above was found.
"""
from __future__ import annotations

from ..catalog import Split, spec_of
from ..data import integrity, registry
from ..data.errors import DatasetError

N_CLASSNAMES = 5
N_TEMPLATES = 3
N_COUNTS = 20          # list every class count up to this many classes
N_BAD_SHOWN = 50       # corrupt files printed in full


def _verify_flag(cfg) -> bool:
    task = cfg.get("task", None) if hasattr(cfg, "get") else getattr(cfg, "task", None)
    if task is None:
        return False
    value = task.get("verify", False) if hasattr(task, "get") else getattr(task, "verify", False)
    return bool(value)


def _name(classnames, t: int) -> str:
    return classnames[t] if 0 <= t < len(classnames) else f"label {t}"


def _print_counts(name: str, split, classnames) -> None:
    counts = integrity.class_counts(split.targets)
    if len(classnames) <= N_COUNTS:
        shown = ", ".join(f"{_name(classnames, t)} {counts.get(t, 0)}" for t in range(len(classnames)))
        print(f"  {name:<10} {shown}")
        return
    if not counts:
        print(f"  {name:<10} (empty)")
        return
    lo = min(counts, key=counts.get)
    hi = max(counts, key=counts.get)
    absent = len(classnames) - len(counts)
    print(f"  {name:<10} {len(counts)} of {len(classnames)} classes present"
          f"{f' ({absent} absent)' if absent else ''}; min {counts[lo]} ({_name(classnames, lo)}), "
          f"max {counts[hi]} ({_name(classnames, hi)})")


def _decode_all(splits) -> dict[str, str]:
    """``{path or item: reason}`` of every item of every split that cannot be decoded."""
    from tqdm.auto import tqdm

    paths: list[str] = []
    bad: dict[str, str] = {}
    for name, split in splits.items():
        if isinstance(split.provenance, integrity.FileItems):
            paths.extend(split.file_paths())
            continue
        idx = split.base_indices()                     # in-memory items (arrays, source files)
        for i, j in enumerate(tqdm(idx, desc=f"decode {split.name}/{name}", leave=False,
                                   disable=len(idx) < integrity.PROGRESS_MIN)):
            try:
                split._load(split.base, j)
            except Exception as e:               # noqa: BLE001 - reported, not hidden
                bad[f"{name} item {i}"] = f"{type(e).__name__}: {e}"
    if paths:
        bad.update(integrity.scan_bad_files(paths, "decode every image"))
    return bad


def inspect_data(cfg) -> int:
    """``cfg`` is the full Hydra config; its ``dataset`` node and ``task.verify`` are used."""
    ds_cfg = cfg.dataset
    verify = _verify_flag(cfg)
    print(f"dataset: {ds_cfg.name} — {spec_of('dataset', ds_cfg).description}")
    print(f"root:    {ds_cfg.root}")
    try:
        splits = {s.value: registry.build_split(ds_cfg, s, check=False) for s in Split}
    except FileNotFoundError as e:
        print(str(e))
        return 1
    except DatasetError as e:
        print(str(e))
        return 1
    for name, split in splits.items():
        print(f"  {name:<10} {len(split):>9,d} images")
    first = splits["test"]
    names = first.classnames
    more = f", ... ({len(names) - N_CLASSNAMES} more)" if len(names) > N_CLASSNAMES else ""
    print(f"classes:   {len(names)}: {', '.join(names[:N_CLASSNAMES])}{more}")
    print(f"templates: {len(first.templates)}, first: "
          + " | ".join(first.templates[:N_TEMPLATES]))

    problems = integrity.split_problems(splits, names)
    bad: dict[str, str] = {}
    if verify:
        print("class counts per split:")
        for name, split in splits.items():
            _print_counts(name, split, names)
        print("verify: decoding every image of every split ...")
        bad = _decode_all(splits)
        if bad:
            print(f"corrupt files: {len(bad)} cannot be decoded (fix or delete them, or set "
                  f"dataset.skip_bad_images=true to skip them):")
            for path, reason in list(sorted(bad.items()))[:N_BAD_SHOWN]:
                print(f"  {path}: {reason}")
            if len(bad) > N_BAD_SHOWN:
                print(f"  ... ({len(bad) - N_BAD_SHOWN} more)")
        else:
            print("verify: every image decodes")
    if problems:
        print("problems:")
        for p in problems:
            print(f"  - {p}")
    if problems or bad:
        return 1
    print("no problems found" + (" (all images decoded)" if verify else
                                 " in the labels (task.verify=true also decodes every image)"))
    return 0
