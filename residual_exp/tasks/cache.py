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
selects the kinds.  Nothing here builds a model or reads a dataset.  See :mod:`residual_exp.cache`.
"""
from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

from filelock import FileLock, Timeout

from ..atomic import remove
from ..cache import (DAMAGED_DIR, MANIFEST_SUFFIX, DamagedEntry, manifest_path, move_aside, spec_path,
                     verify_entry)
from ..tables import text_table

SIDE_SUFFIXES = (MANIFEST_SUFFIX, ".json", ".lock")


def entries(folder: Path) -> list[Path]:
    """The entries of one kind's folder (not side files, temporaries or ``.damaged``)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and not p.name.endswith(SIDE_SUFFIXES))


def _size(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size if p.exists() else 0


def _summary(entry: Path) -> str:
    """model / dataset / split of the entry's spec, when it says."""
    try:
        spec = json.loads(spec_path(entry).read_text())
    except (OSError, ValueError):
        return "?"
    ds = spec.get("dataset") if isinstance(spec.get("dataset"), dict) else {}
    model = spec.get("model") if isinstance(spec.get("model"), dict) else {}
    parts = [model.get("name"), ds.get("name"), ds.get("split"), spec.get("dtype"), spec.get("layout")]
    return " ".join(str(p) for p in parts if p) or ", ".join(sorted(spec))[:60]


def _check(entry: Path) -> str:
    """Sizes against the manifest (no checksums): ``sizes ok``, ``no manifest`` or ``DAMAGED``."""
    if not manifest_path(entry).exists():
        return "no manifest"
    try:
        verify_entry(entry, "size")
        return "sizes ok"
    except DamagedEntry:
        return "DAMAGED"


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def _list(root: Path, kinds: list[str]) -> int:
    """One table per kind (entry, size, build time, size check, what it holds) and totals."""
    n = total = bad = 0
    for kind in kinds:
        rows, kind_total = [], 0
        for e in entries(root / kind):
            size = _size(e)
            kind_total += size
            rows.append({"entry": e.name, "MiB": _mib(size), "check": _check(e), "holds": _summary(e),
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
    damaged = sum(_size(root / k / DAMAGED_DIR) for k in kinds)
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
        with FileLock(str(e) + ".lock"):         # not while a job is building or repairing it
            if not e.exists():
                continue
            try:
                verify_entry(e, "size" if mode == "size" else "always")
                tqdm.write(f"OK       {kind}/{e.name}")
            except DamagedEntry as why:
                bad += 1
                dest = move_aside(e, str(why))
                tqdm.write(f"DAMAGED  {kind}/{e.name}: {why}; moved to {dest}")
    print(f"{len(todo) - bad} of {len(todo)} entries OK" + (f", {bad} damaged (rebuilt by the next run)" if bad else ""))
    return 1 if bad else 0


def _free(lock: Path) -> bool:
    """True when no process holds ``lock`` (nobody is building that entry)."""
    try:
        with FileLock(str(lock), timeout=0):
            return True
    except Timeout:
        return False


_TMP = re.compile(r"^\.(?P<rest>.+)-(?P<pid>\d+)-[0-9a-f]{8}\.(?:tmp|nocache)$")


def _builder_alive(tmp: Path, folder: Path) -> bool:
    """Whether the job that writes the temporary ``tmp`` (``.<entry>.<host>-<pid>-<token>.tmp``)
    may still be running: its entry's lock is held, or it runs on this host; a ``.nocache``
    temporary (written without a lock) of another host counts as running for a day."""
    owner = tmp.name[1:].split(".", 1)[0]
    if not all(_free(l) for l in folder.glob(f"{owner}*.lock")):
        return True
    m = _TMP.match(tmp.name)
    if not m:
        return False
    if m["rest"].endswith("." + socket.gethostname()):
        try:
            os.kill(int(m["pid"]), 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:          # exists, another user's
            return True
    return tmp.name.endswith(".nocache") and time.time() - tmp.stat().st_mtime < 86400


def _prune(root: Path, kinds: list[str], dry_run: bool) -> int:
    doomed: list[Path] = []
    for kind in kinds:
        folder = root / kind
        if not folder.is_dir():
            continue
        if (folder / DAMAGED_DIR).exists():
            doomed.append(folder / DAMAGED_DIR)
        names = {e.name for e in entries(folder)}
        for p in sorted(folder.iterdir()):
            if p.name.startswith(".") and p.name.endswith((".tmp", ".nocache")):          # .<entry>.<token>.tmp
                if not _builder_alive(p, folder):
                    doomed.append(p)
            elif p.name.endswith(SIDE_SUFFIXES):
                entry = next((p.name[: -len(s)] for s in SIDE_SUFFIXES if p.name.endswith(s)), p.name)
                lock = folder / f"{entry}.lock"          # held: the entry is being built (manifest first)
                if entry not in names and (not lock.exists() or _free(lock)):
                    doomed.append(p)
    freed = sum(_size(p) for p in doomed)
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
