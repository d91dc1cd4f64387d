"""Content-keyed, atomic, lock-protected on-disk caches (encodings, bases, classifiers).

Every artefact lives at ``<cache.dir>/<kind>/<hash>`` where ``hash`` is the SHA-1 of a
canonical JSON *spec* of everything that determines it (model identity, weights
fingerprint, dataset, split, size, preprocessing, dtype, format version).  A changed input
gives another key, so a stale entry cannot be reused by mistake; the spec is stored next to
the artefact for inspection.  Writers take a file lock (several jobs may want the same
artefact: one builds it, the others wait and read), write into a temporary path and
``os.replace`` it into place, so an interrupted job never leaves a half-written entry that
looks finished.

Concurrency (several processes, possibly on several hosts sharing the cache directory):

* an entry exists iff its final path exists, and that path only ever appears through one
  atomic rename of a complete temporary file/directory, so readers never lock;
* builders serialise on ``<entry>.lock`` (``filelock``: ``flock``, released by the kernel when
  a job dies, so a killed builder never blocks the next one) and re-check the entry after
  acquiring the lock: exactly one process builds, the others wait and then load it;
* temporary names carry host, pid and a random token (pids repeat across cluster nodes),
  and the lock holder deletes temporaries left by killed builders of the same entry.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock

from .atomic import atomic_write_text, remove, unique_token

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


def spec_hash(spec: dict) -> str:
    blob = json.dumps(spec, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


def file_fingerprint(path: str | os.PathLike) -> str:
    """Size + mtime + SHA-1 of the first and last MiB: cheap and changes when the file does."""
    p = Path(path)
    st = p.stat()
    h = hashlib.sha1(f"{st.st_size}:{int(st.st_mtime)}".encode())
    with open(p, "rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return h.hexdigest()[:16]


class Cache:
    def __init__(self, root: str | os.PathLike, enabled: bool = True) -> None:
        self.root = Path(root)
        self.enabled = enabled

    def path(self, kind: str, spec: dict, suffix: str = "") -> Path:
        return self.root / kind / f"{spec_hash({**spec, '_format': FORMAT_VERSION})}{suffix}"

    @contextmanager
    def locked(self, target: Path) -> Iterator[None]:
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            yield

    def get_or_build(self, kind: str, spec: dict, build: Callable[[Path], None],
                     load: Callable[[Path], Any], suffix: str = "") -> Any:
        """Load the artefact for ``spec``; build it first (``build(tmp_path)``) if absent.

        ``build`` writes to the temporary path it is given (a file or a directory); it is
        moved into place only when ``build`` returns.
        """
        target = self.path(kind, spec, suffix)
        if not self.enabled:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{unique_token()}.nocache")
            try:
                build(tmp)
                return load(tmp) if tmp.is_file() else _load_and_keep(load, tmp)
            finally:
                remove(tmp)
        if target.exists():
            log.info("cache hit: %s/%s", kind, target.name)
            return load(target)
        with self.locked(target):
            if not target.exists():          # another job may have built it meanwhile
                for stale in target.parent.glob(f".{target.name}.*.tmp"):   # from killed builders
                    log.info("removing stale temporary %s", stale.name)
                    remove(stale)
                tmp = target.with_name(f".{target.name}.{unique_token()}.tmp")
                log.info("cache build: %s/%s", kind, target.name)
                try:
                    build(tmp)
                    _write_spec(tmp, spec)
                    os.replace(tmp, target)
                finally:
                    remove(tmp)
                atomic_write_text(target.parent / f"{target.name}.json", json.dumps(spec, indent=1, default=str))
            else:
                log.info("cache hit after wait: %s/%s", kind, target.name)
        return load(target)


def _write_spec(tmp: Path, spec: dict) -> None:
    if tmp.is_dir():
        (tmp / "spec.json").write_text(json.dumps(spec, indent=1, default=str))


def _load_and_keep(load, tmp: Path):
    # cache disabled and the artefact is a directory: load fully into memory before removal
    out = load(tmp)
    return out.materialize() if hasattr(out, "materialize") else out
