"""Atomic writes: nothing half-written is ever visible under a final name.

Every writer in the package (caches, bases, splits, results, λ files, checkpoints of the
tiny CLIP) writes to a temporary path in the destination folder and renames it into place
only when the write completed; on any error (or a kill) the temporary is removed or left
under a dotted ``.tmp`` name that no reader looks at.
"""
from __future__ import annotations

import os
import shutil
import socket
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def unique_token() -> str:
    """host-pid-random: unique among concurrent writers, also on a shared filesystem."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write (a file or a folder); on success it is
    flushed to disk and renamed to ``path``, replacing any previous version."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{unique_token()}.tmp")
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        remove(tmp)


@contextmanager
def replaced_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new temporary folder beside ``path`` to fill; on success it takes ``path``'s place, an
    earlier folder there is moved aside first and removed after (a directory cannot be renamed over a
    non-empty one); on an error nothing changes at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{unique_token()}.tmp")
    old = path.with_name(f".{path.name}.{unique_token()}.old")
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        remove(tmp)
        remove(old)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """``fig.savefig`` to a temporary sibling, then rename (format from ``path``'s suffix)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **savefig_kwargs)
    return path
