"""``task=cache``: list, verify or prune the content-keyed caches under ``cache.dir``.

    python -m residual_exp task=cache                          # entries, sizes, what they hold
    python -m residual_exp task=cache task.action=verify       # checksums of every entry; exit 1 if any is damaged
    python -m residual_exp task=cache task.action=prune [task.dry_run=true]

``list`` prints one row per entry (size, build time, what it holds, and ``check``: its sizes
against its manifest — cheap, no checksums; ``task.action=verify`` reads every byte).
``verify`` checks every entry against its manifest (sizes and BLAKE2b checksums; sizes only with
``cache.verify=size``) and moves damaged ones to ``<kind>/.damaged/`` (the next run rebuilds
them).  ``prune`` removes ``.damaged/``, temporaries of builders that are no longer running
(their entry's lock is free and, on this host, their pid is gone; ``.nocache`` temporaries of
another host only after a day), lock files and side files without an entry.  ``task.kinds``
selects the kinds.  Nothing here builds a model or reads a dataset.  See :mod:`residual_exp.cache` and
:mod:`residual_exp.cache_admin`.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..atomic import remove
from ..cache import DAMAGED_DIR
from ..cache_admin import disk_size, entries, prunable, size_check, summary, verify_and_isolate
from ..tables import text_table


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def _list(root: Path, kinds: list[str]) -> int:
    """One table per kind (entry, size, build time, size check, what it holds) and totals."""
    n = total = bad = 0
    for kind in kinds:
        rows, kind_total = [], 0
        for e in entries(root / kind):
            size = disk_size(e)
            kind_total += size
            rows.append({"entry": e.name, "MiB": _mib(size), "check": size_check(e), "holds": summary(e),
                         "built": time.strftime("%Y-%m-%d %H:%M", time.localtime(e.stat().st_mtime))})
        total += kind_total
        if not rows:
            continue
        n += len(rows)
        bad += sum(r["check"] != "sizes ok" for r in rows)
        print(f"{kind}: {len(rows)} entries, {_mib(kind_total)} MiB")
        print(text_table(rows, ["entry", "MiB", "built", "check", "holds"]) + "\n")
    if bad:
        print(f"{bad} entries damaged or without a manifest: the next run that needs them rebuilds them "
              "(task.action=verify checks every entry and moves damaged ones aside now)")
    damaged = sum(disk_size(root / k / DAMAGED_DIR) for k in kinds)
    print(f"{n} entries, {_mib(total)} MiB under {root}"
          + (f"; {_mib(damaged)} MiB of damaged entries in */{DAMAGED_DIR}/ (task.action=prune removes them)"
             if damaged else ""))
    return 0


def _verify(root: Path, kinds: list[str], mode: str) -> int:
    from tqdm.auto import tqdm
    todo = [(kind, e) for kind in kinds for e in entries(root / kind)]
    bad = 0
    for kind, e in tqdm(todo, desc=f"verify ({'sizes' if mode == 'size' else 'checksums'})", unit="entry",
                        disable=not todo):
        v = verify_and_isolate(e, "size" if mode == "size" else "always")
        if v.gone:
            continue
        if v.moved_to is not None:
            bad += 1
            tqdm.write(f"DAMAGED  {kind}/{e.name}: {v.why}; moved to {v.moved_to}")
        else:
            tqdm.write(f"OK       {kind}/{e.name}")
    print(f"{len(todo) - bad} of {len(todo)} entries OK" + (f", {bad} damaged (rebuilt by the next run)" if bad else ""))
    return 1 if bad else 0


def _prune(root: Path, kinds: list[str], dry_run: bool) -> int:
    doomed = prunable(root, kinds)
    freed = sum(disk_size(p) for p in doomed)
    for p in doomed:
        print(("would remove " if dry_run else "removing ") + str(p.relative_to(root)))
        if not dry_run:
            remove(p)
    print(f"{'would free' if dry_run else 'freed'} {_mib(freed)} MiB ({len(doomed)} paths)")
    return 0


def cache_task(cfg) -> int:
    root, task = Path(cfg.cache.dir), cfg.task
    kinds = [str(k) for k in task.kinds]
    if not root.is_dir():
        print(f"no cache at cache.dir={root}")
        return 0
    if task.action == "list":
        return _list(root, kinds)
    if task.action == "verify":
        return _verify(root, kinds, str(cfg.cache.get("verify", "once")))
    if task.action == "prune":
        return _prune(root, kinds, bool(task.dry_run))
    raise ValueError(f"task.action={task.action!r}; valid: list | verify | prune")
