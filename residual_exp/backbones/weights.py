"""Weights: hub tags, local files, random init — and clear errors when offline."""
from __future__ import annotations

import os
from pathlib import Path


HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")   # a transformers / timm hub repo's weights, preferred first


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be loaded (typically: offline with nothing cached)."""


def check_local_file(path: str, key: str) -> Path:
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise BadWeightsFile(path, "no such file. Give the path of a saved checkpoint (state dict as "
                                   ".pt/.bin/.safetensors), or unset it to use the hub tag.", key)
    if p.stat().st_size == 0:
        raise BadWeightsFile(path, "empty file (0 bytes)", key)
    return p


def offline_hint(what: str, local_option: str, cache_dir: str | None) -> str:
    cache = cache_dir or os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    return (f"Missing: the weights of {what}, which are downloaded from the model hub on first use "
            f"and cached under {cache}.\n"
            f"To fix: run once on a machine with internet (the cache can then be copied here), or "
            f"download the file yourself and pass {local_option}, or use model.pretrained=null for "
            "random weights (tests, decomposition checks).")


# --- local weight files: read them, or say in one line why they cannot be used ---------------------------
class BadWeightsFile(WeightsUnavailable):
    """``model.weights`` names a file that cannot be used as the weights of the chosen model: empty,
    not a weights file, an unsafe pickle (refused, never executed), not a state dict, or the state
    dict of another architecture.  One line naming the file and the reason."""

    def __init__(self, path, reason: str, key: str = "model.weights"):
        self.path, self.reason = str(path), reason
        super().__init__(f"{key}={path}: {reason}")


SAFETENSORS_SUFFIX = ".safetensors"
_ZIP_MAGIC = b"PK\x03\x04"


def _safetensors_header(p: Path) -> bool:
    """Whether ``p`` starts like a safetensors file (8-byte little-endian header size, then ``{``)."""
    with open(p, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n <= p.stat().st_size - 8


def _unpickling_reason(e: BaseException) -> str:
    text = str(e)
    marker = "Unsupported global: GLOBAL "
    if marker in text:
        obj = text.split(marker, 1)[1].split()[0]
        return (f"unsafe pickle refused: it needs the Python object {obj}, and only tensors and plain containers "
                "are loaded (torch.load weights_only=True; nothing in the file was executed). Save the model's "
                "state_dict() instead of the model, or convert it to .safetensors")
    lines = [l.strip() for l in text.splitlines() if "WeightsUnpickler error" in l or l.strip().startswith("Unsupported")]
    detail = lines[-1] if lines else (text.splitlines() or [""])[0]
    return ("unsafe or foreign pickle refused: not a torch checkpoint of tensors (torch.load weights_only=True: "
            f"{detail[:120]}; nothing in the file was executed)")


def load_weights_file(path, key: str = "model.weights", allow: tuple[str, ...] = ()) -> dict:
    """The state dict (name → tensor) in ``path``: a ``.safetensors`` file or a torch checkpoint
    (``torch.save``; read with ``weights_only=True``), unwrapped from ``{"state_dict": …}`` /
    ``{"model": …}`` / ``{"module": …}``.  Anything else raises :class:`BadWeightsFile` with the
    reason.  ``allow``: extra top-level keys whose non-tensor values are dropped silently."""
    import pickle
    import warnings

    import torch
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise BadWeightsFile(path, "no such file", key)
    if p.is_dir():
        raise BadWeightsFile(path, "is a folder, not a weights file", key)
    try:
        size = p.stat().st_size
        if size == 0:
            raise BadWeightsFile(path, "empty file (0 bytes)", key)
        if _safetensors_header(p):
            from safetensors.torch import load_file
            try:
                sd = load_file(str(p))
            except Exception as e:   # a damaged header or truncated data
                raise BadWeightsFile(path, f"damaged safetensors file ({type(e).__name__}: {str(e)[:120]})", key) from None
        else:
            if p.suffix == SAFETENSORS_SUFFIX:
                raise BadWeightsFile(path, "not a safetensors file (no safetensors header)", key)
            with open(p, "rb") as f:
                head = f.read(4)
            try:
                with warnings.catch_warnings():            # torch's notes on foreign pickle protocols
                    warnings.simplefilter("ignore")
                    sd = torch.load(str(p), map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                if head == _ZIP_MAGIC or head[:1] == b"\x80":
                    raise BadWeightsFile(path, _unpickling_reason(e), key) from None
                raise BadWeightsFile(path, _not_weights(head), key) from None
            except (RuntimeError, EOFError, KeyError, ValueError, AttributeError, ImportError) as e:
                if head == _ZIP_MAGIC:
                    raise BadWeightsFile(path, f"damaged torch checkpoint ({type(e).__name__}: "
                                               f"{(str(e).splitlines() or [''])[0][:120]})", key) from None
                raise BadWeightsFile(path, _not_weights(head), key) from None
    except OSError as e:
        raise BadWeightsFile(path, f"cannot be read ({e.strerror or e})", key) from None
    return _state_dict_of(sd, path, key, allow)


def _not_weights(head: bytes) -> str:
    return (f"not a weights file: neither safetensors nor a torch checkpoint (it starts with {head!r}); "
            "give a state dict saved with torch.save(model.state_dict(), …) or safetensors")


def _state_dict_of(obj, path, key: str, allow: tuple[str, ...] = ()) -> dict:
    import torch
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise BadWeightsFile(path, f"not a state dict: the file holds a {type(obj).__name__}, not a mapping of "
                                   "parameter names to tensors", key)
    if not obj:
        raise BadWeightsFile(path, "an empty state dict (no tensors)", key)
    bad = [k for k, v in obj.items() if not torch.is_tensor(v) and k not in allow]
    if bad:
        kinds = sorted({type(obj[k]).__name__ for k in bad})
        raise BadWeightsFile(path, f"not a state dict: {len(bad)} of its {len(obj)} entries are not tensors "
                                   f"(e.g. {bad[0]!r}: {', '.join(kinds)})", key)
    if all(str(k).startswith("module.") for k in obj):        # saved from DataParallel / DDP
        obj = {str(k)[len("module."):]: v for k, v in obj.items()}
    return obj


def mismatch_reason(what: str, missing=(), unexpected=(), shapes=()) -> str:
    """One line: why a state dict is not the weights of ``what`` (missing / unexpected keys, shapes)."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} parameter{'s' if len(missing) != 1 else ''} of the model missing "
                     f"(e.g. {', '.join(list(missing)[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(list(unexpected)[:3])})")
    if shapes:
        parts.append(f"{len(shapes)} of another shape (e.g. {list(shapes)[0]})")
    return f"wrong architecture: not the weights of {what}: " + "; ".join(parts)


def load_error_reason(what: str, e: BaseException) -> str:
    """:func:`mismatch_reason` from the text of torch's ``load_state_dict`` error (strict loading)."""
    import re
    text = str(e)
    grab = lambda label: re.findall(r'"([^"]+)"', (re.search(label + r"[^:]*:([^\n]*)", text) or [None, ""])[1])
    shapes = [f"{m.group(1)}: file {m.group(2)} vs model {m.group(3)}" for m in re.finditer(
        r"size mismatch for ([^:]+): copying a param with shape torch.Size\(([^)]*)\) from checkpoint, the shape "
        r"in current model is torch.Size\(([^)]*)\)", text)]
    missing, unexpected = grab("Missing key"), grab("Unexpected key")
    if not (missing or unexpected or shapes):
        return f"cannot be loaded into {what} ({type(e).__name__}: {(text.splitlines() or [''])[0][:160]})"
    return mismatch_reason(what, missing, unexpected, shapes)


def check_fits(model, state_dict: dict, path, what: str, key: str = "model.weights",
               ignore_missing=()) -> None:
    """Raise :class:`BadWeightsFile` unless ``state_dict`` has exactly ``model``'s parameters and
    shapes (``ignore_missing``: names the model may lack in the file, e.g. a classifier head)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and k not in ignore_missing]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: file {list(v.shape)} vs model {list(own[k].shape)}" for k, v in state_dict.items()
              if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise BadWeightsFile(path, mismatch_reason(what, missing, unexpected, shapes), key)


def diagnose(path, e: BaseException, what: str, key: str = "model.weights") -> BadWeightsFile:
    """Why a library could not load ``path`` as the weights of ``what``: read the file ourselves
    (empty / not weights / unsafe pickle / not a state dict), else the architecture mismatch."""
    if isinstance(e, BadWeightsFile):
        return e
    try:
        load_weights_file(path, key)
    except BadWeightsFile as bad:
        return bad
    return BadWeightsFile(path, load_error_reason(what, e), key)
