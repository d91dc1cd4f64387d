"""``task=evaluate model_dir=DIR dataset=NAME``: accuracy of an export on any dataset's split.

Classifies ``task.split`` (default test) of ``dataset=`` with the export (``task=export``) and
writes ``results.json`` in the format of ``task=train`` (one record: the export's model, method,
seed and parameter count; ``dataset`` and the accuracy on the evaluated set; ``trained_on`` the
dataset the method was trained on).  When the dataset's classes are the export's, its own head is
used; otherwise (transfer) a zero-shot head is built from the dataset's class names and templates
with the export's text tower — the image side stays the adapted encoder.  Models without a text
tower (prototype heads) can only be evaluated on their own classes.
"""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from ..results import results_table, write_results
from ..runtime import resolve_device, run_dir_of

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_split(model, split, batch_size: int, weights: torch.Tensor | None, progress: bool,
                   zero_shot: bool = False) -> float | tuple[float, float]:
    """Micro top-1 accuracy of ``model`` on ``split``; ``weights`` (unit-norm ``[C, D]``) replaces
    the export's head (its scale does not change the argmax).  With ``zero_shot``, also the accuracy of
    the frozen backbone's own feature through the same head (one forward gives both):
    ``(accuracy, zero-shot accuracy)``."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from ..data.registry import stack_images
    device = next(model.parameters()).device
    correct = correct_zs = total = 0
    head = _head(model, weights, device)
    for images, labels in tqdm(DataLoader(split, batch_size=batch_size, collate_fn=stack_images), desc="evaluate",
                               disable=not progress, leave=False):
        adapted, plain = _features(model, images.to(device))
        correct += int((head(adapted).argmax(-1).cpu() == labels).sum())
        if zero_shot:
            correct_zs += int((head(plain).argmax(-1).cpu() == labels).sum())
        total += len(labels)
    if total == 0:
        raise ValueError(f"{split.name}/{split.split}: no images to evaluate")
    return (correct / total, correct_zs / total) if zero_shot else correct / total


def _features(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(adapted, plain)`` image features of an export: the folded readout and the backbone's own
    feature, from one forward (the decomposed forward computes the plain feature too)."""
    bb = model.backbone
    images = images.to(next(bb.parameters()).device, next(bb.parameters()).dtype)
    if model.folded.needs_units:
        raw = bb.decompose_raw(images)
        return model.folded.apply(raw, raw["feature"]), raw["feature"]
    plain = bb.encode_image(images)
    return model.folded.apply(None, plain), plain


def _head(model, weights: torch.Tensor | None, device):
    """Features → logits: the export's own head, or ``weights`` (a zero-shot head of other classes)."""
    if weights is not None:
        w = weights.to(device)
        return lambda f: F.normalize(f, dim=-1) @ w.to(f.dtype).T
    w = F.normalize(model.classifier, dim=-1) if model.normalize_weights else model.classifier
    return lambda f: model.scale * F.normalize(f, dim=-1) @ w.to(f.dtype).T


def evaluate(cfg) -> int:
    from ..classifiers import prompt_reason, check_class_vectors, check_distinct_prompts, zero_shot_weights
    from ..data.errors import DatasetError
    from ..data.registry import build_split
    t0 = time.time()
    from ..export import load_adapted
    model = load_adapted(str(cfg.model_dir), device=resolve_device(cfg.device), verify=bool(cfg.task.verify_export))
    split = build_split(cfg.dataset, str(cfg.task.split), model.preprocess)
    conf, prov = model.config, model.config["provenance"]
    progress = bool(cfg.trainer.progress_bar)
    weights, head = None, "export"
    if list(split.classnames) != list(model.classnames):
        if not model.backbone.has_text:
            raise DatasetError(
                f"dataset={cfg.dataset.name}: its {len(split.classnames)} classes are not the export's "
                f"{len(model.classnames)} ({prov['dataset']}), and {conf['backbone']['name']} has no text tower to build "
                "a head for them: evaluate a prototype-head export on its own classes")
        check_distinct_prompts(model.backbone, split.classnames, split.templates)
        weights = check_class_vectors(zero_shot_weights(model.backbone, split.classnames, split.templates,
                                                        next(model.parameters()).device, progress=progress).float(),
                                      split.classnames, prompt_reason(model.backbone, split.classnames, split.templates))
        head = "zero-shot (new classes)"
    # the frozen backbone's own accuracy through the same head (a finetune export holds only the tuned tower)
    zero_shot = conf["method"] != "finetune"
    acc = evaluate_split(model, split, int(cfg.task.batch_size), weights, progress, zero_shot=zero_shot)
    acc, zs = acc if zero_shot else (acc, None)
    split_name = str(cfg.task.split)
    key = "test_accuracy" if split_name == "test" else f"{split_name}_accuracy"
    zs_key = "zero_shot_test_accuracy" if split_name == "test" else f"zero_shot_{split_name}_accuracy"
    record = {"model": conf["backbone"]["name"], "dataset": split.label or str(cfg.dataset.name), "method": conf["method"],
              "trainable_params": prov.get("trainable_params"), "val_accuracy": None, "test_accuracy": None,
              "zero_shot_val_accuracy": None, "zero_shot_test_accuracy": None, "seed": prov.get("seed"),
              "wall_seconds": round(time.time() - t0, 2), key: acc, zs_key: zs, "split": split_name,
              "n_images": len(split), "trained_on": prov.get("dataset"), "head": head,
              "export": str(cfg.model_dir), "units_convention": conf["conventions"]["units"],
              "classifier": conf["classifier"]["kind"], "evr_rule": conf["conventions"].get("evr_rule"),
              "compat": conf.get("compat", "none"),
              "cache_layout": conf.get("cache_layout")}
    if zs is None:
        record["zero_shot_note"] = "finetune export: the original backbone weights are not in the export"
    out = run_dir_of(cfg)
    out.mkdir(parents=True, exist_ok=True)
    path = write_results([record], out)
    print(results_table([record]))
    print(f"{conf['method']} ({prov.get('dataset')}) on {cfg.dataset.name}/{cfg.task.split}: accuracy {acc:.4f} "
          f"({len(split)} images, head: {head}) → {path}")
    return 0
