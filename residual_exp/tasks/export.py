"""``task=export run_dir=RUN [out=DIR]``: a trained run as one self-contained adapted encoder.

Reads the run's ``config.json``, ``classes.json``, ``results.json`` and best checkpoint (a resumed
run's are found through its ``resumed.json``), rebuilds the backbone of the run's model config,
folds the trained adapter into the readout (its adapter class's ``fold``) and writes the
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
from ..catalog import spec_of
from ..classifiers import record_kind
from ..config import ModelConfig
from ..errors import UserError
from ..export import BACKBONE_FILE, CONFIG_FILE, EXPORT_FORMAT, TENSORS_FILE, output_folder, write_manifest
from ..results import package_version, read_training_run, trained_dir
from ..runtime import seed_everything

log = logging.getLogger(__name__)


def export(cfg) -> int:
    from ..backbones import build_backbone
    from ..methods import adapter_class
    if not cfg.get("run_dir"):
        raise UserError("run_dir=null: task=export needs run_dir=<a run folder of task=train>")
    run_dir = Path(str(cfg.run_dir)).expanduser()
    conf, classes, rec = read_training_run(run_dir)
    method = conf["method"]["name"]
    cls = adapter_class(OmegaConf.create(conf["method"]))
    out = output_folder(Path(str(cfg.out)).expanduser() if cfg.get("out") else run_dir / "export")
    seed_everything(int(conf["seed"]))                       # random-init weights depend on the seed
    model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), conf["model"])
    backbone = build_backbone(model_cfg).eval()
    units = conf["conventions"]["units"]
    backbone.use_convention(units)
    state = {}
    if spec_of("method", conf["method"]).trains:
        ckpt = torch.load(trained_dir(run_dir) / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
        state = ckpt["state_dict"]
    adapter = {k[len("adapter."):]: v for k, v in state.items() if k.startswith("adapter.")}
    tuned = cls.tuned_backbone(adapter)                      # finetune: the tuned tower
    if tuned is not None:
        missing, unexpected = backbone.load_state_dict(tuned, strict=False)
        if unexpected:
            raise KeyError(f"{method} checkpoint does not fit the backbone: unexpected {unexpected[:5]}")
    copy = bool(cfg.task.copy_weights) or tuned is not None or model_cfg.pretrained is None and not model_cfg.weights
    folded = cls.fold(adapter, backbone.double().readout(), conf["method"], conf["cache"]["layout"],
                      conf.get("compat", "none"))
    backbone.float()
    head_weight = state.get("head.weight")                  # None: nothing trained (base)
    prototype = conf["conventions"]["prototype"]
    kind, bias = record_kind(conf.get("classifier", "auto"), backbone.has_text, prototype), 0.0
    if kind == "text":
        scale, norm_w, bias = backbone.logit_scale, True, backbone.logit_bias
    elif prototype == "mean":
        scale, norm_w = 1.0, False
    else:
        scale, norm_w = backbone.logit_scale, True
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
        "classifier": {"kind": kind, "scale": scale, "normalize_weights": norm_w, "bias": bias},
        "classnames": classes["classnames"], "templates": classes["templates"],
        "preprocessing": repr(backbone.transform), "image_size": backbone.image_size,
        "provenance": {"dataset": conf["dataset"]["name"], "seed": conf["seed"], "run_dir": str(run_dir.resolve()),
                       "val_accuracy": rec["val_accuracy"], "test_accuracy": rec["test_accuracy"],
                       "zero_shot_test_accuracy": rec.get("zero_shot_test_accuracy"),
                       "trainable_params": rec.get("trainable_params"), "package_version": package_version(),
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
