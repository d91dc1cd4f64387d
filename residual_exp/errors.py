"""The errors a user can fix in their config: one message, exit status 2 (``__main__.USER_ERRORS``)."""
from __future__ import annotations

from typing import Sequence

from hydra.errors import CompactHydraException

__all__ = ["ConfigError", "JobFailed"]


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
