"""Hooks that always come off: a context manager over forward hooks and instance forwards."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch.nn as nn


class HookSet:
    """Collects hook handles and instance-level ``forward`` overrides; ``remove()`` undoes all.

    Instance-level forwards shadow the class's ``forward`` on *one module object* only
    (never on the class, never on ``torch.nn.functional``); removing deletes the instance
    attribute, so the class method is visible again.
    """

    def __init__(self) -> None:
        self._handles: list = []
        self._forwards: list[nn.Module] = []

    def forward_hook(self, module: nn.Module, fn: Callable) -> None:
        self._handles.append(module.register_forward_hook(fn))

    def forward_pre_hook(self, module: nn.Module, fn: Callable, with_kwargs: bool = False) -> None:
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))

    def instance_forward(self, module: nn.Module, fn: Callable) -> None:
        if "forward" in module.__dict__:
            raise RuntimeError(f"{type(module).__name__} already has an instance forward; "
                               "nested decomposition contexts are not supported")
        module.forward = fn  # bound closure; shadows the class method on this object only
        self._forwards.append(module)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for m in self._forwards:
            m.__dict__.pop("forward", None)
        self._forwards.clear()


@contextmanager
def hooks() -> Iterator[HookSet]:
    hs = HookSet()
    try:
        yield hs
    finally:
        hs.remove()


def count_hooks(model: nn.Module) -> int:
    """Number of live forward (pre-)hooks and instance forwards in ``model`` (tests use it)."""
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks)
        n += int("forward" in m.__dict__)
    return n
