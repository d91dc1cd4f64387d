"""What every task needs before it does anything: seeding, the device, the run folder, quiet
libraries and a frozen backbone.  A leaf module: it imports nothing of the experiment layer.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch RNGs (Lightning's ``seed_everything``, without its log line)."""
    from lightning.fabric.utilities.seed import seed_everything as _seed
    _seed(int(seed), workers=False, verbose=False)


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``; a CUDA request on a machine without
    CUDA is refused (never silently run on the CPU)."""
    device = str(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} but CUDA is not available on this machine "
                           "(use device=cpu or device=auto)")
    return device


def cuda_problems(wants: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """``(key, value, what)`` for each CUDA request (``device=cuda[:N]``, ``trainer.accelerator=gpu``)
    this machine cannot serve (the config validator's only torch-dependent check)."""
    if not torch.cuda.is_available():
        return [(key, value, "CUDA is not available on this machine: use device=cpu or device=auto"
                 + (" and trainer.accelerator=auto (or cpu)" if key == "trainer.accelerator" else ""))
                for key, value in wants]
    n = torch.cuda.device_count()
    return [(key, value, f"this machine has {n} CUDA device{'s' if n != 1 else ''}: use cuda:0 … cuda:{n - 1}, "
                         f"cuda or auto") for key, value in wants
            if key == "device" and value.startswith("cuda:") and int(value[5:]) >= n]


def run_dir_of(cfg) -> Path:
    """The job's own output folder (``paths.output_dir``; the working directory outside Hydra)."""
    try:
        return Path(cfg.paths.output_dir)
    except Exception:  # outside a Hydra run: tests calling run(cfg) directly
        return Path(os.getcwd())


def quiet_libraries() -> None:
    """Keep our INFO logs, silence the chatter of libraries that log to the root logger."""
    root = logging.getLogger()
    if root.level < logging.WARNING:
        root.setLevel(logging.WARNING)
    logging.getLogger("residual_exp").setLevel(logging.INFO)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning",
                 "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


def frozen_backbone(model_cfg, device: str):
    """The backbone of ``model_cfg`` on ``device``, in eval mode, every parameter frozen."""
    from .backbones import build_backbone
    backbone = build_backbone(model_cfg).to(device).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone
