"""ResiDual (arXiv 2411.00246) as a research framework: ``python -m residual_exp --help``.

The one library entry point most users need outside the CLI is :func:`load_adapted`, which
rebuilds a run exported with ``task=export`` as an ``nn.Module`` (``encode_image``, ``forward``,
``preprocess``).
"""
from __future__ import annotations


def load_adapted(folder, device: str = "cpu", verify: bool = True):
    """An exported run (``python -m residual_exp task=export run_dir=RUN``) as an
    :class:`~residual_exp.export.AdaptedModel`, its files checked against the export's manifest first
    (``verify=False`` skips that) — see :func:`residual_exp.export.load_adapted`."""
    from .export import load_adapted as _load
    return _load(folder, device, verify)


__all__ = ["load_adapted"]
