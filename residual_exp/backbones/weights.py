"""Weights: hub tags, local files, random init — and clear errors when offline."""
from __future__ import annotations

import os
from pathlib import Path


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be loaded (typically: offline with nothing cached)."""


def check_local_file(path: str, key: str) -> Path:
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise FileNotFoundError(f"{key}={path!r}: no such file. Give the path of a saved checkpoint "
                                "(state dict as .pt/.bin/.safetensors), or unset it to use the hub tag.")
    return p


def offline_hint(what: str, local_option: str, cache_dir: str | None) -> str:
    cache = cache_dir or os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    return (f"Missing: the weights of {what}, which are downloaded from the model hub on first use "
            f"and cached under {cache}.\n"
            f"To fix: run once on a machine with internet (the cache can then be copied here), or "
            f"download the file yourself and pass {local_option}, or use model.pretrained=null for "
            "random weights (tests, decomposition checks).")
