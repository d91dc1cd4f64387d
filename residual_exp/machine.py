"""What this machine offers a job: the CPU cores it may use, and from them the default number of
data-loading workers.  A leaf module (no torch), so that config resolvers can call it.

``dataset.num_workers`` defaults to ``${auto_workers:}`` = min(:data:`DEFAULT_WORKERS`, usable cores), and
every loader is given at most the usable cores (:func:`loader_workers`): torch warns, and slows down, when a
``DataLoader`` has more worker processes than the cores the process may run on.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 4             # image decoding + preprocessing processes per loader, at most
_warned: set[int] = set()


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: a SLURM allocation, a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):            # not available on this platform
        return max(1, os.cpu_count() or 1)


def default_workers(cap: int | str | None = None) -> int:
    """``${auto_workers:}``: min(``cap`` (default :data:`DEFAULT_WORKERS`), usable cores)."""
    cap = DEFAULT_WORKERS if cap in (None, "") else int(cap)
    return max(0, min(cap, usable_cores()))


def loader_workers(requested: int) -> int:
    """``requested`` worker processes, never more than the usable cores (said once per value)."""
    requested = int(requested)
    cores = usable_cores()
    if requested <= cores:
        return requested
    if requested not in _warned:
        _warned.add(requested)
        log.info("num_workers=%d but this process may use %d core(s): using %d loader workers", requested, cores,
                 cores)
    return cores
