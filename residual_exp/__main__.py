"""``python -m residual_exp [overrides]``: compose the config, run the task, exit with its code.

Examples::

    python -m residual_exp                                   # ResiDual on the embedded synthetic task
    python -m residual_exp method=residual_fine dataset=shapes_shape
    python -m residual_exp -m method=base,residual_coarse,residual_full
    python -m residual_exp task=check_decomposition model=clip_b model.pretrained=null
    python -m residual_exp --help                            # config groups and options
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from .config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from .run import run          # here, not at the top: `--help` stays fast (no torch import)
    code = run(cfg)
    if code:
        # Hydra swallows return values; a non-zero exit status must leave the process.
        # (In multirun, raise so that Hydra records the job as failed and carries on.)
        from hydra.core.hydra_config import HydraConfig
        if HydraConfig.get().mode.name == "MULTIRUN":
            raise RuntimeError(f"task {cfg.task.name} failed with exit code {code}")
        sys.exit(code)


if __name__ == "__main__":
    main()
