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

Integrity.  Every entry has a manifest, ``<entry>.manifest.json``: the size and BLAKE2b
checksum of each of its files, written (atomically) before the entry is renamed into place.
Before an entry is used it is verified (``cache.verify``): ``once`` — sizes and checksums the
first time the entry is loaded in a process; ``always`` — on every load; ``size`` — sizes only
(catches truncation, not flipped bytes; for very large caches).  A mismatch, a missing or
unreadable manifest, or a loader failure (a truncated ``.npy``, a broken safetensors header)
makes the entry *damaged*: a warning names the file and what is wrong, the entry and its side
files are moved to ``<kind>/.damaged/`` (never deleted silently; ``task=cache action=prune``
removes them) and it is rebuilt under the lock, as a miss.  If the rebuilt entry cannot be
used either, :class:`CacheError` names it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock

from .atomic import atomic_write_text, remove, unique_token
from .catalog import Verify, names

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


MANIFEST_SUFFIX = ".manifest.json"
DAMAGED_DIR = ".damaged"
VERIFY_MODES = names(Verify)
_CHUNK = 1 << 22
_verified: set[tuple[str, int]] = set()        # (entry path, manifest mtime_ns) verified in this process


class CacheError(RuntimeError):
    """A cache entry that cannot be used even after it was rebuilt (names the entry)."""


class DamagedEntry(Exception):
    """An entry whose files do not match its manifest (``str``: which file and how)."""


def _files(entry: Path) -> dict[str, Path]:
    if entry.is_dir():
        return {str(p.relative_to(entry)): p for p in sorted(entry.rglob("*")) if p.is_file()}
    return {".": entry}                          # a file entry (its name differs while it is built)


def file_checksum(path: Path) -> str:
    """BLAKE2b (128 bit) of a file's bytes, streamed."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: Path) -> list:
    """``[size, blake2b]`` of one file: what manifests (and the results store) record."""
    return [path.stat().st_size, file_checksum(path)]


def manifest_of(entry: Path) -> dict:
    """``{"files": {relative path: [size, blake2b]}}`` of a file or directory entry."""
    return {"format": 1, "files": {rel: file_record(p) for rel, p in _files(entry).items()}}


def manifest_path(entry: Path) -> Path:
    return entry.with_name(entry.name + MANIFEST_SUFFIX)


def verify_entry(entry: Path, mode: str = "always") -> None:
    """Raise :class:`DamagedEntry` unless ``entry`` matches its manifest (``mode``: ``size``
    compares sizes only; anything else also checksums)."""
    mpath = manifest_path(entry)
    try:
        want = json.loads(mpath.read_text())["files"]
    except FileNotFoundError:
        raise DamagedEntry(f"no manifest {mpath.name} (written by an older version, or the build was "
                           "interrupted)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DamagedEntry(f"unreadable manifest {mpath.name} ({e})") from None
    have = _files(entry)
    if sorted(have) != sorted(want):
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        raise DamagedEntry(f"files differ from the manifest (missing: {missing or '-'}, unexpected: {extra or '-'})")
    for rel, (size, digest) in want.items():
        try:                                     # OSError: unreadable, or moved aside meanwhile by another job
            got = have[rel].stat().st_size
            if got != size:
                raise DamagedEntry(f"{rel}: {got} bytes, the manifest says {size} (truncated or rewritten)")
            if mode != "size" and file_checksum(have[rel]) != digest:
                raise DamagedEntry(f"{rel}: checksum mismatch (the bytes changed after the entry was built)")
        except OSError as e:
            raise DamagedEntry(f"{rel}: cannot be read ({e.strerror or e})") from None


def spec_path(entry: Path) -> Path:
    """The entry's spec, ``<entry>.json`` (what it was built from, for inspection)."""
    return entry.with_name(entry.name + ".json")


def side_files(entry: Path) -> list[Path]:
    """The entry's spec JSON and manifest."""
    return [spec_path(entry), manifest_path(entry)]


def move_aside(entry: Path, why: str) -> Path:
    """Move a damaged entry and its side files to ``<kind>/.damaged/<name>.<time>.<token>/``."""
    dest = entry.parent / DAMAGED_DIR / f"{entry.name}.{time.strftime('%Y%m%dT%H%M%S')}.{unique_token()}"
    dest.mkdir(parents=True, exist_ok=True)
    for p in [entry, *side_files(entry)]:
        if p.exists():
            shutil.move(str(p), str(dest / p.name))
    atomic_write_text(dest / "why.txt", why + "\n")
    return dest


class Cache:
    def __init__(self, root: str | os.PathLike, enabled: bool = True, verify: str = "once") -> None:
        if verify not in VERIFY_MODES:
            raise ValueError(f"cache.verify={verify!r}; valid: {' | '.join(VERIFY_MODES)}")
        self.root = Path(root)
        self.enabled = enabled
        self.verify = verify

    def path(self, kind: str, spec: dict, suffix: str = "") -> Path:
        return self.root / kind / f"{spec_hash({**spec, '_format': FORMAT_VERSION})}{suffix}"

    @contextmanager
    def locked(self, target: Path) -> Iterator[None]:
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            yield

    def _verified_load(self, target: Path, load: Callable[[Path], Any]) -> Any:
        """``load(target)`` after verifying it (per :attr:`verify`); DamagedEntry if it is not usable."""
        try:
            stamp = (str(target), manifest_path(target).stat().st_mtime_ns)
        except OSError:
            stamp = None
        if self.verify != "once" or stamp not in _verified:
            verify_entry(target, self.verify)
            if stamp is not None:
                _verified.add(stamp)
        try:
            return load(target)
        except Exception as e:          # a loader failing on an entry that passed: damaged (e.g. verify=size)
            _verified.discard(stamp)
            raise DamagedEntry(f"cannot be loaded: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e

    def get_or_build(self, kind: str, spec: dict, build: Callable[[Path], None],
                     load: Callable[[Path], Any], suffix: str = "") -> Any:
        """Load the artefact for ``spec``; build it first (``build(tmp_path)``) if absent or
        damaged.

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
            try:
                out = self._verified_load(target, load)
                log.info("cache hit: %s/%s", kind, target.name)
                return out
            except DamagedEntry:
                pass                                  # handled under the lock: another job may be on it
        with self.locked(target):
            if target.exists():                       # another job may have built or repaired it meanwhile
                try:
                    out = self._verified_load(target, load)
                    log.info("cache hit after wait: %s/%s", kind, target.name)
                    return out
                except DamagedEntry as e:
                    dest = move_aside(target, str(e))
                    log.warning("cache: damaged entry %s/%s: %s; moved to %s, rebuilding", kind, target.name, e, dest)
            self._build(kind, spec, target, build)
        try:
            return self._verified_load(target, load)
        except DamagedEntry as e:
            raise CacheError(f"cache entry {target} is not usable right after it was built ({e}); check the "
                             f"disk holding cache.dir={self.root}") from e

    def _build(self, kind: str, spec: dict, target: Path, build: Callable[[Path], None]) -> None:
        for stale in target.parent.glob(f".{target.name}.*.tmp"):   # from killed builders
            log.info("removing stale temporary %s", stale.name)
            remove(stale)
        tmp = target.with_name(f".{target.name}.{unique_token()}.tmp")
        log.info("cache build: %s/%s", kind, target.name)
        try:
            build(tmp)
            _write_spec(tmp, spec)
            # the manifest first: an entry without one is damaged, a manifest without an entry a miss
            atomic_write_text(manifest_path(target), json.dumps(manifest_of(tmp)))
            os.replace(tmp, target)
        finally:
            remove(tmp)
        atomic_write_text(spec_path(target), json.dumps(spec, indent=1, default=str))


def _write_spec(tmp: Path, spec: dict) -> None:
    if tmp.is_dir():
        (tmp / "spec.json").write_text(json.dumps(spec, indent=1, default=str))


def _load_and_keep(load, tmp: Path):
    # cache disabled and the artefact is a directory: load fully into memory before removal
    out = load(tmp)
    return out.materialize() if hasattr(out, "materialize") else out
