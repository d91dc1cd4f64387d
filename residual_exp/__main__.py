"""``python -m residual_exp [overrides]``: compose the config, run the task, exit with its code.

Examples::

    python -m residual_exp                                   # ResiDual on the embedded synthetic task
    python -m residual_exp method=residual_fine dataset=shapes_shape
    python -m residual_exp -m method=base,residual_coarse,residual_full
    python -m residual_exp task=check_decomposition model=clip_b model.pretrained=null
    python -m residual_exp task=report sweep_dir=outputs/sweeps/…       # tables + ablation figures
    python -m residual_exp task=dashboard sweep_dir=outputs/sweeps/…    # W&B workspace of the sweep
    python -m residual_exp --help                            # config groups and options

An override Hydra cannot compose (an unknown key, a missing option: :mod:`residual_exp.overrides`),
a bad config value (:class:`~residual_exp.validate.ConfigError`) and the data / model problems a
user can fix (:data:`USER_ERRORS`) end the job with ``error: <message>`` on stderr and exit
status 2, without a traceback.  In a multirun the job is recorded as failed by Hydra with that
message (the sweep stops after the batch, exit status 2).
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from .config import register_configs
from .errors import EXIT_USER_ERROR

register_configs()

# module → exception classes that are the user's to fix: printed as one message, exit status 2.
# Looked up in sys.modules only: a module never imported cannot have raised (and --help or a
# refused config stay free of torch).
USER_ERRORS = {
    "residual_exp.errors": ("ConfigError", "UserError"),  # the config; paths, run / export folders, changed exports
    "residual_exp.data.errors": ("DatasetError",),          # DatasetNotFound, SplitMismatchError, BadImageError, …
    "residual_exp.backbones.base": ("UnsupportedArchitecture",),
    "residual_exp.backbones.weights": ("WeightsUnavailable",),
    "residual_exp.results": ("ResultsFileError",),
    "residual_exp.encode": ("EncodingOverflow",),
}


def _user_error_types() -> tuple[type, ...]:
    types = []
    for module, names in USER_ERRORS.items():
        mod = sys.modules.get(module)
        types += [getattr(mod, n) for n in names if mod is not None and hasattr(mod, n)]
    return tuple(types)


def _user_message(e: BaseException) -> str | None:
    """The ``error:`` lines of a problem the user can fix (a user error, or an operating-system
    error about one of the user's paths: read-only, a file where a folder is needed, a full disk),
    else None."""
    if isinstance(e, _user_error_types()):
        return _message(e)
    from .errors import os_error_message            # a leaf module (no torch)
    line = os_error_message(e)
    return f"error: {line}" if line else None


def _message(e: BaseException) -> str:
    problems = getattr(e, "problems", None) or [_unwrap(str(e).strip()) or type(e).__name__]
    return "\n".join(f"error: {p}" for p in problems)


def _unwrap(text: str) -> str:
    """The original message of an error re-raised from a DataLoader worker (torch puts the
    worker's traceback into the message: "Caught X in DataLoader worker process 0. Original
    Traceback …\nmodule.X: message")."""
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    head, sep, rest = last.partition(": ")
    return rest if sep and "." in head and " " not in head else last


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    try:
        return HydraConfig.get().mode.name == "MULTIRUN"
    except ValueError:                               # not inside a Hydra app
        return False


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _app(cfg: DictConfig) -> None:
    from .run import run          # here, not at the top: `--help` stays fast (no torch import)
    try:
        code = run(cfg)
    except Exception as e:
        message = _user_message(e)
        if message is None:
            raise
        if _multirun():                              # Hydra records the job as failed, message only
            from .errors import JobFailed
            raise JobFailed(message) from None
        print(message, file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    if code:
        # Hydra swallows return values; a non-zero exit status must leave the process.
        # (In multirun, raise so that Hydra records the job as failed and carries on.)
        if _multirun():
            raise RuntimeError(f"task {cfg.task.name} failed with exit code {code}")
        sys.exit(code)


def main() -> None:
    if any(a in ("--help", "-h") for a in sys.argv[1:]):
        from .catalog.specs import SEARCHPATH
        from .help import help_text                 # generated from the catalog (Hydra's: --hydra-help)
        from .overrides import searchpath
        SEARCHPATH.set(searchpath(sys.argv[1:]))     # options of a hydra.searchpath=[…] folder too
        print(help_text())
        sys.exit(0)
    from .overrides import precheck
    problems = precheck(sys.argv[1:])                # overrides Hydra cannot compose: our wording, exit 2
    if not problems:
        from .overrides import output_dir_problem
        problems = [p for p in [output_dir_problem(sys.argv[1:])] if p]   # a run folder Hydra cannot create
    if problems:
        print("\n".join(f"error: {p}" for p in problems), file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    try:
        _app()
    except SystemExit as e:
        from .errors import JobFailed
        if e.code == 1 and JobFailed.seen:           # Hydra exits 1 after reporting a failed job
            sys.exit(EXIT_USER_ERROR)
        raise


if __name__ == "__main__":
    main()
