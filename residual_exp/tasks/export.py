"""``task=export run_dir=RUN [out=DIR]``: a trained run as one self-contained adapted encoder.

Reads the run's ``config.json``, ``classes.json``, ``results.json`` and best checkpoint (a resumed
run's are found through its ``resumed.json``), rebuilds the backbone of the run's model config,
folds the trained adapter into the readout (:func:`residual_exp.export.fold`) and writes the
folder :func:`residual_exp.export.load_adapted` reads (atomically: a killed export leaves
nothing).  See :mod:`residual_exp.export` for what the folder holds.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ..atomic import replaced_folder
from ..config import ModelConfig
from ..errors import UserError, writable_dir
from ..export import BACKBONE_FILE, CONFIG_FILE, EXPORT_FORMAT, TENSORS_FILE, fold, write_manifest
from ..results import read_classes, read_results, read_run_config
from ..runtime import resolve_device, seed_everything

log = logging.getLogger(__name__)


def _trained_dir(run_dir: Path) -> Path:
    """Where the run's checkpoint lives (a resumed run points at the run that computed it)."""
    if (run_dir / "checkpoints" / "best.ckpt").is_file():
        return run_dir
    resumed = run_dir / "resumed.json"
    if resumed.is_file():
        origin = Path(json.loads(resumed.read_text()).get("from_run_dir") or "")
        if (origin / "checkpoints" / "best.ckpt").is_file():
            return origin
    raise UserError(f"run_dir={str(run_dir)!r}: no checkpoints/best.ckpt (and no resumed.json pointing at a "
                    "run that has one): export needs a run of task=train with a trained method")


def _package_version() -> str:
    try:
        from importlib.metadata import version
        return version("residual_exp")
    except Exception:
        return "unknown"


def read_run(run_dir: Path) -> tuple[dict, dict, dict]:
    """``(config, classes, the method's record)`` of a ``task=train`` run folder, or a user error saying
    why the folder is not one (empty, another task's, a run that failed before writing its results)."""
    what = f"run_dir={run_dir}"
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{what}: not a run folder of task=train (no config.json; a training run writes "
                        "config.json, classes.json and results.json)")
    try:
        conf = read_run_config(run_dir)
        method = conf["method"]["name"]
        for key in ("model", "dataset", "conventions", "cache", "seed"):
            conf[key]
    except (KeyError, TypeError) as e:
        raise UserError(f"{what}: config.json is not the config of a training run (no {e})") from None
    if conf.get("task", {}).get("name", "train") != "train":
        raise UserError(f"{what}: a run of task={conf['task']['name']}, not a training run")
    if not (run_dir / "results.json").is_file():
        raise UserError(f"{what}: no results.json: the run did not finish (train it again, or export another run)")
    records = read_results(run_dir / "results.json")
    rec = next((r for r in records if r.get("method") == method), None)
    if rec is None:
        raise UserError(f"{what}: results.json has no record of its method {method}")
    return conf, read_classes(run_dir), rec


def output_folder(out: Path, key: str = "out") -> Path:
    """``out`` as a place for a new export: a new or empty folder, or an earlier export (replaced); anything
    else (a file, a folder with other content, a folder that cannot be written) is refused before work."""
    writable_dir(out, key)
    if out.exists() and any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
        raise UserError(f"{key}={out}: exists and is not an export folder (it holds other files); choose a new "
                        "or empty folder")
    return out


def export(cfg) -> int:
    from ..backbones import build_backbone
    if not cfg.get("run_dir"):
        raise UserError("run_dir=null: task=export needs run_dir=<a run folder of task=train>")
    run_dir = Path(str(cfg.run_dir)).expanduser()
    conf, classes, rec = read_run(run_dir)
    method = conf["method"]["name"]
    out = output_folder(Path(str(cfg.out)).expanduser() if cfg.get("out") else run_dir / "export")
    seed_everything(int(conf["seed"]))                       # random-init weights depend on the seed
    model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), conf["model"])
    backbone = build_backbone(model_cfg).eval()
    units = conf["conventions"]["units"]
    backbone.use_convention(units)
    state = {}
    if method != "base":
        ckpt = torch.load(_trained_dir(run_dir) / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
        state = ckpt["state_dict"]
    adapter = {k[len("adapter."):]: v for k, v in state.items() if k.startswith("adapter.")}
    copy = bool(cfg.task.copy_weights) or method == "finetune" or model_cfg.pretrained is None and not model_cfg.weights
    if method == "finetune":                                 # the tuned tower
        tuned = {k[len("backbone."):]: v for k, v in adapter.items() if k.startswith("backbone.")}
        missing, unexpected = backbone.load_state_dict(tuned, strict=False)
        if unexpected:
            raise KeyError(f"finetune checkpoint does not fit the backbone: unexpected {unexpected[:5]}")
    folded = fold(method, adapter, backbone.double().readout(), conf["cache"]["layout"], conf["method"]["others"],
                  float(conf["method"]["dropped_value"]), conf.get("compat") == "official" and
                  conf["method"]["others"] == "mean")
    backbone.float()
    if method == "base":
        head_weight = None
    else:
        head_weight = state["head.weight"]
    prototype = conf["conventions"]["prototype"]
    if backbone.has_text:
        kind, scale, norm_w = "text", backbone.logit_scale, True
    elif prototype == "mean":
        kind, scale, norm_w = "prototype-mean", 1.0, False
    else:
        kind, scale, norm_w = "prototype-cosine", backbone.logit_scale, True
    if head_weight is None:                                  # base: rebuild the frozen head like task=train
        from ..pipeline import Session
        job = OmegaConf.create(conf)
        job.device = "cpu"
        s = Session.open(job, model_cfg, progress=False)
        head_weight = s.classifier(job.dataset, classes["classnames"], classes["templates"]).weight
    model_node = OmegaConf.to_container(model_cfg, resolve=True)
    model_node["logit_scale"] = float(backbone.logit_scale)       # the scale this backbone has (a text tower's own)
    config = {
        "format": EXPORT_FORMAT, "backbone": model_node, "weights": "copy" if copy else "reference",
        "output_dim": backbone.output_dim, "method": method, "method_config": conf["method"],
        "conventions": conf["conventions"], "compat": conf.get("compat", "none"), "cache_layout": conf["cache"]["layout"],
        "classifier": {"kind": kind, "scale": scale, "normalize_weights": norm_w},
        "classnames": classes["classnames"], "templates": classes["templates"],
        "preprocessing": repr(backbone.transform), "image_size": backbone.image_size,
        "provenance": {"dataset": conf["dataset"]["name"], "seed": conf["seed"], "run_dir": str(run_dir.resolve()),
                       "val_accuracy": rec["val_accuracy"], "test_accuracy": rec["test_accuracy"],
                       "zero_shot_test_accuracy": rec.get("zero_shot_test_accuracy"),
                       "trainable_params": rec.get("trainable_params"), "package_version": _package_version(),
                       "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S")},
    }
    from safetensors.torch import save_file
    tensors = {k: v.float().contiguous() for k, v in folded.tensors().items()}
    tensors["classifier"] = head_weight.float().contiguous()
    with replaced_folder(out) as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE))
        if copy:
            # the library model's own state dict: what model.weights= loads (clones: no shared storage)
            save_file({k: v.detach().float().contiguous().clone() for k, v in backbone.model.state_dict().items()},
                      str(tmp / BACKBONE_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1, default=str))
        write_manifest(tmp, None if copy else model_cfg.weights and str(Path(str(model_cfg.weights)).expanduser()
                                                                        .resolve()))
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(f"exported {method} of {run_dir} → {out} ({size:.1f} MiB; weights {config['weights']}; "
          f"test accuracy {rec['test_accuracy']:.4f})")
    print(f"load it with: residual_exp.load_adapted({str(out)!r})")
    return 0
