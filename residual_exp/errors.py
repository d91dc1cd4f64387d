"""Problems the user can fix, reported as one ``error: …`` line each and exit status 2
(``USER_ERRORS`` in ``__main__``), never a traceback.

* :class:`ConfigError` — every problem of a config, one ``key=value: what is allowed`` line each;
* :class:`UserError` — a problem outside the config and the data
  (:class:`~residual_exp.data.errors.DatasetError`): a run, export or results folder that is not
  what a task needs, a changed export file, an output path that cannot be written;
* :class:`JobFailed` — what a multirun job raises instead, so that Hydra records it as failed.

:func:`os_error_message` says which operating-system errors are the user's (a read-only or
file-valued output path, a full disk, a path that is too long): those are reported the same way,
naming the path.  A leaf module: it imports nothing of the package (nor torch).
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Sequence

from hydra.errors import CompactHydraException

__all__ = ["EXIT_USER_ERROR", "ConfigError", "JobFailed", "UserError", "os_error_message", "writable_dir"]
EXIT_USER_ERROR = 2                    # the exit status of every problem the user can fix


class ConfigError(ValueError):
    """Every problem of a config, one ``key=value: what is allowed`` line each."""

    def __init__(self, problems: str | Sequence[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))

    def __reduce__(self):                                # survives pickling (submitit jobs)
        return (type(self), (self.problems,))


class JobFailed(CompactHydraException):
    """Raised in a multirun job instead of a user error, so that Hydra records the job as failed
    and prints this message alone (no traceback).  ``seen`` tells the entry point to exit 2."""
    seen = False

    def __init__(self, *args):
        super().__init__(*args)
        JobFailed.seen = True                            # also when unpickled from a launcher job


class UserError(ValueError):
    """A problem of the user's paths or files (one line, exit status 2)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# errno → what to tell the user (the path is named in front)
_USER_ERRNOS = {
    errno.EACCES: "permission denied (choose a folder you can write, or fix its permissions)",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system (choose a writable folder)",
    errno.ENOTDIR: "a path component is a file, not a folder",
    errno.EISDIR: "is a folder, a file was expected",
    errno.EEXIST: "already exists",
    errno.ENOTEMPTY: "folder is not empty",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENOENT: "no such file or folder",
}


def os_error_message(e: BaseException) -> str | None:
    """One line for an ``OSError`` that is the user's to fix (a path that cannot be read or
    written), else None (a bug, or a problem of another kind)."""
    if not isinstance(e, OSError) or e.errno not in _USER_ERRNOS:
        return None
    where = e.filename if e.filename is not None else None
    if where is None:
        return None                      # no path to name: not a problem of the user's paths
    extra = f" → {e.filename2}" if getattr(e, "filename2", None) else ""
    return f"{where}{extra}: {_USER_ERRNOS[e.errno]}"


def writable_dir(path: str | os.PathLike, key: str) -> Path:
    """``path`` as a folder this process can create and write into, or :class:`UserError` naming
    ``key`` (checked before any work, so that nothing is computed for an output that cannot be
    written)."""
    p = Path(path).expanduser()
    probe = p
    while not probe.exists():            # the first existing ancestor must be a writable folder
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserError(f"{key}={path}: {probe} is a file, not a folder")
    if probe.is_dir():
        import tempfile
        try:                             # a real write (permission bits do not stop root; a read-only mount does)
            fd, tmp = tempfile.mkstemp(dir=probe, prefix=".residual_exp-write-check-")
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            raise UserError(f"{key}={path}: cannot write in {probe} ({e.strerror or e}); choose a folder you can "
                            "write") from None
    return p
