"""``inspect_data``: what a ``dataset=...`` config resolves to on this machine.

Prints split sizes, the number of classes, a few class names and the first prompt
templates; when the data is missing, prints the layout expected under ``dataset.root`` and
how to obtain it.  Returns 0 on success, 1 when the data is missing or unreadable.
Building the train/val splits stores the dataset's split file if it did not exist yet.
"""
from __future__ import annotations

from ..data import registry
from ..data.registry import SPLITS

N_CLASSNAMES = 5
N_TEMPLATES = 3


def inspect_data(cfg) -> int:
    """``cfg`` is the full Hydra config; only its ``dataset`` node is used."""
    ds_cfg = cfg.dataset
    try:
        entry = registry.get_entry(ds_cfg.name)
    except KeyError as e:
        print(e.args[0])
        return 1
    print(f"dataset: {entry.name} — {entry.description}")
    print(f"root:    {ds_cfg.root}")
    try:
        splits = {s: registry.build_split(ds_cfg, s) for s in SPLITS}
    except FileNotFoundError as e:
        print(str(e))
        layout = entry.meta.get("layout")
        if layout and "expected layout" not in str(e):      # a loader without our message
            print("expected layout under root:\n  " + layout.replace("\n", "\n  "))
            print("how to get it:\n  " + entry.how_to_get)
        return 1
    for name, split in splits.items():
        print(f"  {name:<10} {len(split):>9,d} images")
    first = splits["test"]
    names = first.classnames
    more = f", ... ({len(names) - N_CLASSNAMES} more)" if len(names) > N_CLASSNAMES else ""
    print(f"classes:   {len(names)}: {', '.join(names[:N_CLASSNAMES])}{more}")
    print(f"templates: {len(first.templates)}, first: "
          + " | ".join(first.templates[:N_TEMPLATES]))
    return 0
