"""Maintenance of a cache directory: what ``task=cache`` lists, verifies and prunes.

A kind's folder (``<cache.dir>/<kind>/``) holds entries (see :mod:`residual_exp.cache`), their
side files (``.json`` spec, ``.manifest.json``, ``.lock``), temporaries of builders
(``.<entry>.<host>-<pid>-<token>.tmp``, or ``.nocache`` with the cache disabled) and
``.damaged/``.  Nothing here builds a model or reads a dataset, and nothing prints.
"""
from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path
from typing import NamedTuple

from filelock import FileLock, Timeout

from .cache import DAMAGED_DIR, MANIFEST_SUFFIX, DamagedEntry, manifest_path, move_aside, spec_path, verify_entry

SIDE_SUFFIXES = (MANIFEST_SUFFIX, ".json", ".lock")
_TMP = re.compile(r"^\.(?P<rest>.+)-(?P<pid>\d+)-[0-9a-f]{8}\.(?:tmp|nocache)$")


def entries(folder: Path) -> list[Path]:
    """The entries of one kind's folder (not side files, temporaries or ``.damaged``)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and not p.name.endswith(SIDE_SUFFIXES))


def disk_size(p: Path) -> int:
    """Bytes of a file, or of every file under a folder; 0 when ``p`` does not exist."""
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size if p.exists() else 0


def summary(entry: Path) -> str:
    """model / dataset / split of the entry's spec, when it says."""
    try:
        spec = json.loads(spec_path(entry).read_text())
    except (OSError, ValueError):
        return "?"
    ds = spec.get("dataset") if isinstance(spec.get("dataset"), dict) else {}
    model = spec.get("model") if isinstance(spec.get("model"), dict) else {}
    parts = [model.get("name"), ds.get("name"), ds.get("split"), spec.get("dtype"), spec.get("layout")]
    return " ".join(str(p) for p in parts if p) or ", ".join(sorted(spec))[:60]


def size_check(entry: Path) -> str:
    """Sizes against the manifest (no checksums): ``sizes ok``, ``no manifest`` or ``DAMAGED``."""
    if not manifest_path(entry).exists():
        return "no manifest"
    try:
        verify_entry(entry, "size")
        return "sizes ok"
    except DamagedEntry:
        return "DAMAGED"


class Verdict(NamedTuple):
    gone: bool = False                 # removed by another job meanwhile: nothing was checked
    why: str = ""                      # why the entry is damaged; empty when it is fine
    moved_to: Path | None = None       # where the damaged entry now lies


def verify_and_isolate(entry: Path, mode: str) -> Verdict:
    """Verify ``entry`` (``mode``: ``size`` or ``always``) under its lock (not while a job builds
    or repairs it); a damaged entry is moved aside (:func:`residual_exp.cache.move_aside`)."""
    with FileLock(str(entry) + ".lock"):
        if not entry.exists():
            return Verdict(gone=True)
        try:
            verify_entry(entry, mode)
            return Verdict()
        except DamagedEntry as why:
            return Verdict(why=str(why), moved_to=move_aside(entry, str(why)))


def lock_free(lock: Path) -> bool:
    """True when no process holds ``lock`` (nobody is building that entry)."""
    try:
        with FileLock(str(lock), timeout=0):
            return True
    except Timeout:
        return False


def builder_alive(tmp: Path, folder: Path) -> bool:
    """Whether the job that writes the temporary ``tmp`` (``.<entry>.<host>-<pid>-<token>.tmp``)
    may still be running: its entry's lock is held, or it runs on this host; a ``.nocache``
    temporary (written without a lock) of another host counts as running for a day."""
    owner = tmp.name[1:].split(".", 1)[0]
    if not all(lock_free(l) for l in folder.glob(f"{owner}*.lock")):
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


def prunable(root: Path, kinds: list[str]) -> list[Path]:
    """What prune removes: ``.damaged/``, temporaries of builders no longer running, and lock
    and side files without an entry (unless their lock is held: the entry is being built)."""
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
                if not builder_alive(p, folder):
                    doomed.append(p)
            elif p.name.endswith(SIDE_SUFFIXES):
                entry = next((p.name[: -len(s)] for s in SIDE_SUFFIXES if p.name.endswith(s)), p.name)
                lock = folder / f"{entry}.lock"          # held: the entry is being built (manifest first)
                if entry not in names and (not lock.exists() or lock_free(lock)):
                    doomed.append(p)
    return doomed
